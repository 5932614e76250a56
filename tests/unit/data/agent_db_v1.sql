-- state_dir/agent.db as the first release (0.1.0) wrote it: its schema and rows made
-- through its StateStore (tests/unit/test_agent_state.py migrates it)
BEGIN TRANSACTION;
CREATE TABLE attachments (
    network TEXT NOT NULL, container_id TEXT NOT NULL, ifname TEXT NOT NULL,
    plugin TEXT NOT NULL, state TEXT NOT NULL, netns TEXT NOT NULL,
    host_ifname TEXT, pool TEXT NOT NULL, ip TEXT, mac TEXT, result TEXT,
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (network, container_id, ifname)
);
INSERT INTO "attachments" VALUES('rack1','c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1','eth0','netd-cni','ready','/run/netns/c1','ndv5d0e3f0c1a2b','lab','198.18.0.50','0a:58:c6:12:00:32','{"cniVersion": "1.1.0", "interfaces": [{"name": "ndv5d0e3f0c1a2b", "mac": "ee:3c:9a:00:11:22"}, {"name": "eth0", "mac": "0a:58:c6:12:00:32", "sandbox": "/run/netns/c1"}], "ips": [{"address": "198.18.0.50/24", "gateway": "198.18.0.1", "interface": 1}], "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}, {"dst": "198.19.0.0/16", "gw": "198.18.0.1"}], "dns": {}}',1.7961606770271470547e+09,1.7961606770271470547e+09);
INSERT INTO "attachments" VALUES('rack1','c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2','eth0','netd-cni','adding','/run/netns/c2','ndv0123456789ab','lab',NULL,NULL,NULL,1.79616067702738189696e+09,1.79616067702738189696e+09);
INSERT INTO "attachments" VALUES('bridged','c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3','eth1','netd-ipam','ready','/run/netns/c3',NULL,'lab','198.18.0.51','0a:58:c6:12:00:33','{"cniVersion": "1.1.0", "ips": [{"address": "198.18.0.51/24", "gateway": "198.18.0.1"}], "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}], "dns": {}}',1.79616067702745461466e+09,1.79616067702745461466e+09);
CREATE TABLE docker_addresses (
    pool TEXT NOT NULL, ip TEXT NOT NULL, owner TEXT NOT NULL, mac TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (pool, ip)
);
INSERT INTO "docker_addresses" VALUES('lab','198.18.0.60','e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1','02:42:c6:12:00:3c',1.79616067702770280836e+09);
INSERT INTO "docker_addresses" VALUES('lab','198.18.0.61','docker-pending-0242c612003d','02:42:c6:12:00:3d',1.79616067702777791018e+09);
CREATE TABLE docker_endpoints (
    endpoint_id TEXT PRIMARY KEY, network_id TEXT NOT NULL, pool TEXT NOT NULL,
    ip TEXT NOT NULL, address TEXT NOT NULL, mac TEXT NOT NULL, state TEXT NOT NULL,
    host_ifname TEXT NOT NULL, peer_ifname TEXT NOT NULL, sandbox TEXT NOT NULL DEFAULT '',
    docker_pid INTEGER NOT NULL DEFAULT 0, container_name TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL
);
INSERT INTO "docker_endpoints" VALUES('e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1','dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','lab','198.18.0.60','198.18.0.60/24','02:42:c6:12:00:3c','joined','ndd1a2b3c4d5e6f','ndp1a2b3c4d5e6f','/var/run/docker/netns/0123abcd',4242,'web',1.79616067702783846851e+09,1.79616067702783846851e+09);
INSERT INTO "docker_endpoints" VALUES('e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2','dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','lab','198.18.0.62','198.18.0.62/24','02:42:c6:12:00:3e','creating','ndd6f5e4d3c2b1a','ndp6f5e4d3c2b1a','',0,'',1.79616067702799773217e+09,1.79616067702799773217e+09);
CREATE TABLE docker_networks (
    network_id TEXT PRIMARY KEY, pool TEXT NOT NULL, cidr TEXT NOT NULL, gateway TEXT,
    created REAL NOT NULL
);
INSERT INTO "docker_networks" VALUES('dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','lab','198.18.0.0/24','198.18.0.1',1.79616067702762222287e+09);
CREATE TABLE pending_releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, container_id TEXT NOT NULL,
    ifname TEXT NOT NULL, ip TEXT, queued REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
INSERT INTO "pending_releases" VALUES(1,'lab','c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4','eth0','198.18.0.52',1.79616067702753949165e+09,0,'IPAM unreachable');
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('pending_releases',1);
COMMIT;
