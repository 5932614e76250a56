"""netd.cni.protocol: request validation, result building and version conversion."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netd.cni import protocol as cni
from netd.cni.protocol import CniError, GcAttachment

CID = "0123456789abcdef"
NETNS = "/var/run/netns/c1"


def conf(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"cniVersion": "1.0.0", "name": "podnet", "type": "netd-cni",
                           "pool": "rack1"}
    for key, value in over.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def ipam_conf(**ipam_over: Any) -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": "netd-ipam", "pool": "rack1"}
    ipam.update(ipam_over)
    return {"cniVersion": "1.0.0", "name": "br", "type": "bridge", "ipam": ipam}


def env(**over: str | None) -> dict[str, str]:
    doc = {"CNI_CONTAINERID": CID, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "", "CNI_PATH": "/opt/cni/bin"}
    for key, value in over.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def code_of(plugin: str, command: str, e: Any, config: Any) -> int:
    with pytest.raises(CniError) as info:
        cni.parse_request(plugin, command, e, config)
    return info.value.code


# --- parse_request: the happy paths -------------------------------------------------


def test_add_request_carries_everything() -> None:
    config = conf(agentSocket="/tmp/a.sock", runtimeConfig={"mac": "02:00:00:00:00:01"},
                  dns={"nameservers": ["198.18.0.53"], "search": []})
    req = cni.parse_request("netd-cni", "ADD",
                            env(CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;IgnoreUnknown=1"),
                            config)
    assert req.plugin == "netd-cni" and not req.is_ipam
    assert req.command == "ADD"
    assert req.cni_version == "1.0.0"
    assert req.network == "podnet"
    assert req.pool == "rack1"
    assert req.agent_socket == "/tmp/a.sock"
    assert (req.container_id, req.netns, req.ifname) == (CID, NETNS, "eth0")
    assert req.owner == (CID, "eth0")
    assert req.cni_path == "/opt/cni/bin"
    assert req.args == {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web-0", "IgnoreUnknown": "1"}
    assert req.k8s_pod == "ns/web-0"
    assert req.handle == "ns/web-0"
    assert req.labels == {"netd.network": "podnet", "k8s.pod": "ns/web-0"}
    assert req.runtime_config == {"mac": "02:00:00:00:00:01"}
    assert req.dns == {"nameservers": ["198.18.0.53"]}
    assert req.prev_result is None
    assert req.valid_attachments == ()
    assert req.config is config


def test_defaults() -> None:
    req = cni.parse_request("netd-cni", "ADD", env(CNI_ARGS=None, CNI_PATH=None), conf())
    assert req.agent_socket == cni.DEFAULT_AGENT_SOCKET
    assert req.args == {} and req.cni_path == ""
    assert req.runtime_config == {} and req.dns == {}
    assert req.k8s_pod is None and req.handle is None
    assert req.labels == {"netd.network": "podnet"}


def test_netd_handle_wins_over_pod() -> None:
    req = cni.parse_request(
        "netd-cni", "ADD",
        env(CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=db-0;NETD_HANDLE=fixed/db"), conf())
    assert req.handle == "fixed/db"


def test_ipam_request_reads_the_ipam_section() -> None:
    config = ipam_conf(agentSocket="/run/other.sock", dns={"domain": "lab"})
    config["pool"] = "not-this-one"
    config["agentSocket"] = "/not/this.sock"
    req = cni.parse_request("netd-ipam", "ADD", env(), config)
    assert req.is_ipam
    assert req.pool == "rack1"
    assert req.agent_socket == "/run/other.sock"
    assert req.dns == {"domain": "lab"}
    assert req.network == "br"


def test_del_without_netns_is_fine() -> None:
    req = cni.parse_request("netd-cni", "DEL", env(CNI_NETNS=None), conf())
    assert req.netns == ""


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_need_no_attachment(command: str) -> None:
    config = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
    req = cni.parse_request("netd-cni", command, {}, config)
    assert (req.container_id, req.ifname, req.netns) == ("", "", "")
    # an attachment in the environment is ignored, not validated
    req = cni.parse_request("netd-cni", command, env(CNI_IFNAME="x" * 40), config)
    assert req.ifname == ""


# --- parse_request: every error branch -----------------------------------------------


def test_unknown_plugin_and_command() -> None:
    assert code_of("netd-foo", "ADD", env(), conf()) == cni.INVALID_ENVIRONMENT
    for command in ("VERSION", "add", "", "FOO"):
        assert code_of("netd-cni", command, env(), conf()) == cni.INVALID_ENVIRONMENT


def test_env_must_be_a_mapping_of_strings() -> None:
    assert code_of("netd-cni", "ADD", ["CNI_IFNAME"], conf()) == cni.INVALID_ENVIRONMENT
    bad: dict[str, Any] = env()
    bad["CNI_IFNAME"] = 5
    assert code_of("netd-cni", "ADD", bad, conf()) == cni.INVALID_ENVIRONMENT


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("var", ["CNI_CONTAINERID", "CNI_IFNAME"])
@pytest.mark.parametrize("value", [None, ""])
def test_missing_attachment_env(command: str, var: str, value: str | None) -> None:
    config = conf(prevResult={"cniVersion": "1.0.0"})
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", command, env(**{var: value}), config)
    assert info.value.code == cni.INVALID_ENVIRONMENT
    assert var in info.value.msg


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_missing_netns(command: str) -> None:
    config = conf(prevResult={"cniVersion": "1.0.0"})
    assert code_of("netd-cni", command, env(CNI_NETNS=None), config) == cni.INVALID_ENVIRONMENT


def test_missing_env_is_reported_before_config_problems() -> None:
    assert code_of("netd-cni", "ADD", env(CNI_IFNAME=None), "not a config") == \
        cni.INVALID_ENVIRONMENT


@pytest.mark.parametrize("config", [None, [], "x", 3])
def test_config_must_be_an_object(config: Any) -> None:
    assert code_of("netd-cni", "ADD", env(), config) == cni.DECODING_FAILURE


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.4.1", "1.2.0", "2.0.0", "x"])
def test_unsupported_version(version: str) -> None:
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "ADD", env(), conf(cniVersion=version))
    assert info.value.code == cni.INCOMPATIBLE_VERSION
    assert version in info.value.details
    assert "1.1.0" in info.value.details


def test_missing_or_mistyped_version() -> None:
    assert code_of("netd-cni", "ADD", env(), conf(cniVersion=None)) == cni.INCOMPATIBLE_VERSION
    assert code_of("netd-cni", "ADD", env(), conf(cniVersion="")) == cni.INCOMPATIBLE_VERSION
    assert code_of("netd-cni", "ADD", env(), conf(cniVersion=1.0)) == cni.INVALID_CONFIG


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_every_supported_version_is_accepted_for_add(version: str) -> None:
    assert cni.parse_request("netd-cni", "ADD", env(), conf(cniVersion=version)).cni_version \
        == version


def test_version_negotiation() -> None:
    pick = cni.negotiate_version
    assert pick({"cniVersions": ["0.3.1", "1.0.0", "1.1.0"]}) == "1.1.0"
    assert pick({"cniVersions": ["1.1.0", "0.4.0"]}) == "1.1.0"
    assert pick({"cniVersions": ["0.4.0", "1.5.0", "0.3.1"]}) == "0.4.0"
    # cniVersion is what the runtime expects results in: it decides
    assert pick({"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"]}) == "1.0.0"
    with pytest.raises(CniError) as info:
        pick({"cniVersions": ["0.2.0", "2.0.0"]})
    assert info.value.code == cni.INCOMPATIBLE_VERSION
    for bad in ("1.1.0", ["1.1.0", 1], {"v": "1.1.0"}):
        with pytest.raises(CniError) as info:
            pick({"cniVersions": bad})
        assert info.value.code == cni.INVALID_CONFIG
    req = cni.parse_request("netd-cni", "GC", {}, {
        "cniVersions": ["1.0.0", "1.1.0"], "name": "n", "pool": "p",
        "cni.dev/valid-attachments": []})
    assert req.cni_version == "1.1.0"


@pytest.mark.parametrize(("command", "version", "ok"), [
    ("CHECK", "0.3.0", False), ("CHECK", "0.3.1", False), ("CHECK", "0.4.0", True),
    ("CHECK", "1.0.0", True), ("GC", "1.0.0", False), ("GC", "0.4.0", False),
    ("GC", "1.1.0", True), ("STATUS", "1.0.0", False), ("STATUS", "1.1.0", True),
    ("DEL", "0.3.0", True),
])
def test_command_needs_version(command: str, version: str, ok: bool) -> None:
    config = conf(cniVersion=version, prevResult={"cniVersion": version},
                  **{"cni.dev/valid-attachments": []})
    if ok:
        assert cni.parse_request("netd-cni", command, env(), config).cni_version == version
    else:
        with pytest.raises(CniError) as info:
            cni.parse_request("netd-cni", command, env(), config)
        assert info.value.code == cni.INCOMPATIBLE_VERSION
        assert command in info.value.details


@pytest.mark.parametrize("ifname", [
    "x" * 16, "eth/0", "eth 0", "eth:0", ".", "..", "eth\t0", "eth\n", "\u2003eth",
    "\u00e9" * 8,  # 8 characters, 16 bytes: the kernel counts bytes
    "eth\x01", "eth\x7f", "eth\u202e0",  # control characters, a bidirectional override
])
def test_invalid_ifname(ifname: str) -> None:
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "ADD", env(CNI_IFNAME=ifname), conf())
    assert info.value.code == cni.INVALID_ENVIRONMENT
    assert "CNI_IFNAME" in info.value.msg


@pytest.mark.parametrize("ifname", ["x" * 15, "eth0", "net1.100", "a-b_c", "...", "e..",
                                    "\u00e9" * 7])
def test_valid_ifname(ifname: str) -> None:
    assert cni.parse_request("netd-cni", "ADD", env(CNI_IFNAME=ifname), conf()).ifname == ifname


@pytest.mark.parametrize("cid", ["-abc", "_abc", ".abc", "a b", "a/b", "ab\n", "ab;c", "é",
                                 "a" * 201, "a" * 256])
def test_invalid_container_id(cid: str) -> None:
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "DEL", env(CNI_CONTAINERID=cid), conf())
    assert info.value.code == cni.INVALID_ENVIRONMENT
    assert "CNI_CONTAINERID" in info.value.msg


@pytest.mark.parametrize("cid", ["a", "0", "abc_1.2-x", "A" * 64, "b" * 200])
def test_valid_container_id(cid: str) -> None:
    assert cni.parse_request("netd-cni", "DEL", env(CNI_CONTAINERID=cid), conf()).container_id \
        == cid


@pytest.mark.parametrize("name", [None, "", 7, ["n"], "-net", "my net"])
def test_invalid_network_name(name: Any) -> None:
    config = conf()
    if name is None:
        del config["name"]
    else:
        config["name"] = name
    assert code_of("netd-cni", "ADD", env(), config) == cni.INVALID_CONFIG


@pytest.mark.parametrize("pool", [None, "", "  ", 5, ["rack1"], {"name": "rack1"}])
def test_invalid_pool(pool: Any) -> None:
    config = conf()
    if pool is None:
        del config["pool"]
    else:
        config["pool"] = pool
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "ADD", env(), config)
    assert info.value.code == cni.INVALID_CONFIG
    assert "pool" in info.value.msg


def test_ipam_plugin_needs_its_section_and_pool() -> None:
    top_level_pool = conf()  # "pool" at the top is not where netd-ipam looks
    assert code_of("netd-ipam", "ADD", env(), top_level_pool) == cni.INVALID_CONFIG
    assert code_of("netd-ipam", "ADD", env(), ipam_conf(pool=None)) == cni.INVALID_CONFIG
    assert code_of("netd-ipam", "ADD", env(), ipam_conf(pool="")) == cni.INVALID_CONFIG
    assert code_of("netd-ipam", "ADD", env(), {**ipam_conf(), "ipam": "netd-ipam"}) == \
        cni.INVALID_CONFIG
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-ipam", "ADD", env(), ipam_conf(pool=None))
    assert "ipam.pool" in info.value.msg


@pytest.mark.parametrize("sock", [5, "", ["/a"]])
def test_invalid_agent_socket(sock: Any) -> None:
    assert code_of("netd-cni", "ADD", env(), conf(agentSocket=sock)) == cni.INVALID_CONFIG
    assert code_of("netd-ipam", "ADD", env(), ipam_conf(agentSocket=sock)) == cni.INVALID_CONFIG


@pytest.mark.parametrize("dns", ["8.8.8.8", {"nameservers": "8.8.8.8"}, {"domain": 5},
                                 {"search": [1]}])
def test_invalid_dns(dns: Any) -> None:
    assert code_of("netd-cni", "ADD", env(), conf(dns=dns)) == cni.INVALID_CONFIG


def test_invalid_runtime_config() -> None:
    assert code_of("netd-cni", "ADD", env(), conf(runtimeConfig=[])) == cni.INVALID_CONFIG


def test_cni_args() -> None:
    assert cni.parse_cni_args("") == {}
    assert cni.parse_cni_args("A=1;B=2;") == {"A": "1", "B": "2"}
    assert cni.parse_cni_args(" A = 1 ; ;B=") == {"A": "1", "B": ""}
    assert cni.parse_cni_args("X=a=b") == {"X": "a=b"}
    for bad in ("A", "A=1;B", "=1"):
        with pytest.raises(CniError) as info:
            cni.parse_cni_args(bad)
        assert info.value.code == cni.INVALID_ENVIRONMENT
    assert code_of("netd-cni", "ADD", env(CNI_ARGS="K8S_POD_NAME"), conf()) == \
        cni.INVALID_ENVIRONMENT


# --- prevResult, CHECK -------------------------------------------------------------------

PREV_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "vnd0123456789ab"},
                   {"name": "eth0", "mac": "02:00:c6:12:00:0a", "sandbox": NETNS}],
    "ips": [{"version": "4", "interface": 1, "address": "198.18.0.10/24",
             "gateway": "198.18.0.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}],
    "dns": {},
}


def test_prev_result_is_converted_to_the_current_shape() -> None:
    req = cni.parse_request("netd-cni", "CHECK", env(),
                            conf(cniVersion="0.4.0", prevResult=copy.deepcopy(PREV_040)))
    assert req.prev_result == {
        "cniVersion": "1.1.0",
        "interfaces": PREV_040["interfaces"],
        "ips": [{"interface": 1, "address": "198.18.0.10/24", "gateway": "198.18.0.1"}],
        "routes": PREV_040["routes"],
    }
    # without its own cniVersion, prevResult is in the config's version
    prev = copy.deepcopy(PREV_040)
    del prev["cniVersion"]
    req = cni.parse_request("netd-cni", "CHECK", env(), conf(cniVersion="0.4.0", prevResult=prev))
    assert req.prev_result is not None and "version" not in req.prev_result["ips"][0]


def test_check_needs_a_readable_prev_result() -> None:
    assert code_of("netd-cni", "CHECK", env(), conf()) == cni.INVALID_CONFIG
    assert code_of("netd-cni", "CHECK", env(), conf(prevResult=[1])) == cni.INVALID_CONFIG
    assert code_of("netd-cni", "CHECK", env(), conf(prevResult={"ips": "x"})) == \
        cni.INVALID_CONFIG
    assert code_of("netd-cni", "CHECK", env(),
                   conf(prevResult={"cniVersion": "0.2.0"})) == cni.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_a_broken_prev_result_never_fails_add_or_del(command: str) -> None:
    for prev in ([1], {"ips": "x"}, {"cniVersion": "0.2.0"}):
        req = cni.parse_request("netd-cni", command, env(), conf(prevResult=prev))
        assert req.prev_result is None


# --- GC ------------------------------------------------------------------------------------


def gc_conf(**keys: Any) -> dict[str, Any]:
    return conf(cniVersion="1.1.0", **keys)


def test_gc_valid_attachments() -> None:
    items = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"},
             {"containerID": "a", "ifname": "eth0"}]
    req = cni.parse_request("netd-cni", "GC", {}, gc_conf(**{"cni.dev/valid-attachments": items}))
    assert req.valid_attachments == (GcAttachment("a", "eth0"), GcAttachment("b", "net1"))
    assert ("a", "eth0") in set(req.valid_attachments)  # plain tuples compare equal
    assert req.valid_attachments[1].container_id == "b"


def test_gc_legacy_key_and_precedence() -> None:
    legacy = [{"containerID": "old", "ifname": "eth0"}]
    new = [{"containerID": "new", "ifname": "eth0"}]
    assert cni.parse_valid_attachments({"cni.dev/attachments": legacy}) == (("old", "eth0"),)
    assert cni.parse_valid_attachments({"cni.dev/attachments": legacy,
                                        "cni.dev/valid-attachments": new}) == (("new", "eth0"),)


def test_gc_null_means_none_valid_and_absent_is_refused() -> None:
    config = gc_conf()
    config["cni.dev/valid-attachments"] = None  # libcni's nil slice
    req = cni.parse_request("netd-cni", "GC", {}, config)
    assert req.valid_attachments == ()
    assert cni.parse_valid_attachments({}) is None
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "GC", {}, gc_conf())
    assert info.value.code == cni.INVALID_CONFIG
    assert "valid-attachments" in info.value.msg


@pytest.mark.parametrize("items", [
    {"containerID": "a"}, "a", [["a", "eth0"]], [{"containerID": "a"}],
    [{"containerID": "", "ifname": "eth0"}], [{"containerID": "a", "ifname": 0}],
])
def test_gc_malformed_attachments(items: Any) -> None:
    with pytest.raises(CniError) as info:
        cni.parse_request("netd-cni", "GC", {}, gc_conf(**{"cni.dev/valid-attachments": items}))
    assert info.value.code == cni.INVALID_CONFIG


# --- CniError -------------------------------------------------------------------------------


def test_cni_error() -> None:
    err = CniError(cni.TRY_AGAIN_LATER, "try again later: IPAM unreachable", "timed out")
    assert err.to_dict("0.4.0") == {"cniVersion": "0.4.0", "code": 11,
                                    "msg": "try again later: IPAM unreachable",
                                    "details": "timed out"}
    assert err.to_dict()["cniVersion"] == cni.LATEST_VERSION
    assert str(err) == "try again later: IPAM unreachable: timed out"
    assert str(CniError(7, "bad")) == "bad"
    assert "CniError(7" in repr(CniError(7, "bad"))
    assert isinstance(err, Exception)


def test_error_codes_match_the_contract() -> None:
    assert (cni.INCOMPATIBLE_VERSION, cni.UNSUPPORTED_FIELD, cni.UNKNOWN_CONTAINER,
            cni.INVALID_ENVIRONMENT, cni.IO_FAILURE, cni.DECODING_FAILURE, cni.INVALID_CONFIG,
            cni.TRY_AGAIN_LATER, cni.PLUGIN_NOT_AVAILABLE) == (1, 2, 3, 4, 5, 6, 7, 11, 50)
    assert (cni.INTERNAL, cni.POOL_NOT_FOUND, cni.POOL_EXHAUSTED, cni.ADDRESS_IN_USE,
            cni.DATAPLANE_FAILURE, cni.IPAM_REFUSED, cni.INTERFACE_IN_USE) \
        == (100, 101, 102, 103, 104, 105, 106)
    assert cni.SUPPORTED_VERSIONS == ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


# --- results ---------------------------------------------------------------------------------


def sample_result() -> dict[str, Any]:
    return cni.build_result(
        ifname="eth0", mac="02:00:C6:12:00:0A", sandbox=NETNS, address="198.18.0.10/24",
        gateway="198.18.0.1", host_ifname="vnd0123456789ab",
        routes=[("0.0.0.0/0", "198.18.0.1"), ("10.1.2.3/8", None)],
        dns={"nameservers": ["198.18.0.53"], "domain": "", "search": ["lab"], "options": []})


def test_build_result() -> None:
    assert sample_result() == {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "vnd0123456789ab"},
                       {"name": "eth0", "mac": "02:00:c6:12:00:0a", "sandbox": NETNS}],
        "ips": [{"address": "198.18.0.10/24", "gateway": "198.18.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}, {"dst": "10.0.0.0/8"}],
        "dns": {"nameservers": ["198.18.0.53"], "search": ["lab"]},
    }


def test_build_result_minimal_and_dual_stack() -> None:
    result = cni.build_result(ifname="net1", mac="", sandbox=NETNS,
                              address="2001:db8:0:0::a/64", gateway=None,
                              extra_ips=[("198.18.0.9/24", "198.18.0.1")], dns={})
    assert result == {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "sandbox": NETNS}],
        "ips": [{"address": "2001:db8::a/64", "interface": 0},
                {"address": "198.18.0.9/24", "gateway": "198.18.0.1", "interface": 0}],
    }


def test_build_result_rejects_malformed_values() -> None:
    for address in ("198.18.0.10", "198.18.0.300/24", "nope/1"):
        with pytest.raises(ValueError):
            cni.build_result(ifname="eth0", mac="", sandbox=NETNS, address=address)
    with pytest.raises(ValueError):
        cni.build_result(ifname="eth0", mac="", sandbox=NETNS, address="10.0.0.2/8",
                         gateway="10.0.0.x")


def test_build_ipam_result() -> None:
    result = cni.build_ipam_result(address="198.18.0.10/24", gateway="198.18.0.1",
                                   routes=[("0.0.0.0/0", "198.18.0.1")], dns=None)
    assert result == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "198.18.0.10/24", "gateway": "198.18.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}],
    }
    assert "interfaces" not in result


def test_convert_to_040_follows_libcni() -> None:
    assert cni.convert(sample_result(), "0.4.0") == {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "vnd0123456789ab"},
                       {"name": "eth0", "mac": "02:00:c6:12:00:0a", "sandbox": NETNS}],
        "ips": [{"version": "4", "interface": 1, "address": "198.18.0.10/24",
                 "gateway": "198.18.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}, {"dst": "10.0.0.0/8"}],
        "dns": {"nameservers": ["198.18.0.53"], "search": ["lab"]},
    }
    assert cni.convert(sample_result(), "0.3.0")["cniVersion"] == "0.3.0"
    assert cni.convert(sample_result(), "0.3.1")["ips"][0]["version"] == "4"


def test_convert_between_1x_only_sets_the_version() -> None:
    result = sample_result()
    result["interfaces"][1]["mtu"] = 1400  # a 1.1.0 field
    down = cni.convert(result, "1.0.0")
    assert down == {**result, "cniVersion": "1.0.0"}
    assert cni.convert(down, "1.1.0") == result


def test_convert_to_legacy_drops_new_interface_fields_and_sets_ip_versions() -> None:
    result = {"cniVersion": "1.1.0",
              "interfaces": [{"name": "eth0", "mac": "", "sandbox": NETNS, "mtu": 9000,
                              "socketPath": "/x", "pciID": "0000:00:01.0"}],
              "ips": [{"address": "2001:db8::5/64", "gateway": "2001:db8::1", "interface": 0},
                      {"address": "::ffff:198.18.0.5/120"}, {"address": "10.0.0.5/8"}],
              "dns": {"nameservers": [], "domain": ""}}
    out = cni.convert(result, "0.4.0")
    assert out["interfaces"] == [{"name": "eth0", "sandbox": NETNS}]
    assert [ip["version"] for ip in out["ips"]] == ["6", "4", "4"]
    assert "dns" not in out and "routes" not in out


def test_convert_up_from_legacy() -> None:
    up = cni.convert(PREV_040, "1.0.0")
    assert up["cniVersion"] == "1.0.0"
    assert up["ips"] == [{"interface": 1, "address": "198.18.0.10/24", "gateway": "198.18.0.1"}]
    assert "dns" not in up
    assert cni.convert({"cniVersion": "0.3.1"}, "1.1.0") == {"cniVersion": "1.1.0"}
    assert cni.convert({}, "0.4.0") == {"cniVersion": "0.4.0"}
    assert PREV_040["ips"][0]["version"] == "4"  # the input is not changed


def test_convert_errors() -> None:
    with pytest.raises(CniError) as info:
        cni.convert(sample_result(), "0.2.0")
    assert info.value.code == cni.INCOMPATIBLE_VERSION
    with pytest.raises(CniError) as info:
        cni.convert({"cniVersion": "0.1.0", "ip4": {}}, "1.0.0")
    assert info.value.code == cni.INCOMPATIBLE_VERSION
    for bad in ({"ips": {"address": "x"}}, {"interfaces": ["eth0"]}, {"routes": 5},
                {"dns": ["8.8.8.8"]}):
        with pytest.raises(CniError) as info:
            cni.convert(bad, "1.0.0")
        assert info.value.code == cni.INVALID_CONFIG
    with pytest.raises(CniError):
        cni.convert([], "1.0.0")  # type: ignore[arg-type]


def test_ip_version() -> None:
    assert cni.ip_version("198.18.0.1/24") == "4"
    assert cni.ip_version("fd00::1/64") == "6"
    assert cni.ip_version("::ffff:10.0.0.1/128") == "4"
    assert cni.ip_version("garbage:") == "6"
    assert cni.ip_version("garbage") == "4"


# --- compare_prev_result -----------------------------------------------------------------------


def test_compare_identical_and_converted() -> None:
    recorded = sample_result()
    assert cni.compare_prev_result(recorded, recorded) == []
    for version in cni.SUPPORTED_VERSIONS:
        assert cni.compare_prev_result(cni.convert(recorded, version), recorded) == []


def test_compare_tolerates_chained_additions_and_route_changes() -> None:
    recorded = sample_result()
    prev = copy.deepcopy(recorded)
    prev["interfaces"].append({"name": "ifb0", "mac": "02:11:22:33:44:55"})  # bandwidth
    prev["ips"].append({"address": "fd00::10/64", "interface": 1})
    prev["routes"] = []
    prev["interfaces"][1]["mac"] = "02:00:C6:12:00:0A"  # case differs only
    assert cni.compare_prev_result(prev, recorded) == []


def test_compare_reports_each_problem() -> None:
    recorded = sample_result()
    assert cni.compare_prev_result(None, recorded) == ["prevResult is missing"]
    prev = copy.deepcopy(recorded)
    prev["interfaces"][1]["mac"] = "02:00:00:00:00:99"
    prev["ips"][0]["gateway"] = "198.18.0.254"
    problems = cni.compare_prev_result(prev, recorded)
    assert len(problems) == 2
    assert "02:00:00:00:00:99" in problems[0] and "02:00:c6:12:00:0a" in problems[0]
    assert "198.18.0.254" in problems[1]

    prev = copy.deepcopy(recorded)
    prev["interfaces"] = prev["interfaces"][:1]
    prev["ips"] = []
    problems = cni.compare_prev_result(prev, recorded)
    assert problems == [f"interface eth0 in {NETNS} is not in prevResult",
                        "address 198.18.0.10/24 is not in prevResult"]

    prev = copy.deepcopy(recorded)
    prev["ips"][0]["interface"] = 0
    assert cni.compare_prev_result(prev, recorded) == [
        "address 198.18.0.10/24 is on vnd0123456789ab in prevResult, netd put it on eth0"]
    assert cni.compare_prev_result({"cniVersion": "9.9.9"}, recorded)[0].startswith(
        "prevResult cannot be read")


# --- properties ----------------------------------------------------------------------------------

ipv4 = st.builds(lambda n, p: f"{ipaddress.IPv4Address(n)}/{p}",
                 st.integers(0, 2**32 - 1), st.integers(0, 32))
ipv6 = st.builds(lambda n, p: f"{ipaddress.IPv6Address(n)}/{p}",
                 st.integers(0, 2**128 - 1), st.integers(0, 128))
cidr = st.one_of(ipv4, ipv6)
gateway = st.one_of(st.none(), cidr.map(lambda c: c.split("/")[0]))
mac = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b))
name = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=15)
words = st.lists(st.text("abcdefghij.", min_size=1, max_size=8), max_size=3)
dns = st.fixed_dictionaries({}, optional={
    "nameservers": words, "domain": st.text("abc.", max_size=6), "search": words,
    "options": words})


@st.composite
def results(draw: st.DrawFn) -> dict[str, Any]:
    ips = draw(st.lists(st.tuples(cidr, gateway), min_size=1, max_size=3))
    host = draw(st.one_of(st.none(), name))
    return cni.build_result(
        ifname=draw(name), mac=draw(mac), sandbox="/proc/1/ns/net",
        address=ips[0][0], gateway=ips[0][1], extra_ips=ips[1:],
        host_ifname=host, host_mac=draw(st.one_of(st.none(), mac)) if host else None,
        routes=draw(st.lists(st.tuples(cidr, gateway), max_size=3)), dns=draw(dns))


@given(results(), st.sampled_from(cni.SUPPORTED_VERSIONS))
@settings(max_examples=300)
def test_convert_round_trips(result: dict[str, Any], version: str) -> None:
    converted = cni.convert(result, version)
    assert converted["cniVersion"] == version
    assert cni.convert(converted, version) == converted  # idempotent
    assert cni.convert(converted, cni.LATEST_VERSION) == result  # nothing is lost
    for ip in converted["ips"]:
        if version in cni.LEGACY_RESULT_VERSIONS:
            want = "4" if ipaddress.ip_interface(ip["address"]).version == 4 else "6"
            assert ip["version"] == want
        else:
            assert "version" not in ip
        assert converted["interfaces"][ip["interface"]].get("sandbox") == "/proc/1/ns/net"
    assert cni.compare_prev_result(converted, result) == []


@given(st.dictionaries(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=12),
                       st.text("abcdefghijklmnop/.-_0123456789=", max_size=12), max_size=5))
def test_cni_args_round_trip(args: dict[str, str]) -> None:
    text = ";".join(f"{k}={v}" for k, v in args.items())
    assert cni.parse_cni_args(text) == args


@given(st.text(max_size=20))
def test_ifname_rule(ifname: str) -> None:
    valid = (0 < len(ifname.encode("utf-8", "replace")) <= 15 and ifname not in (".", "..")
             and not any(c in "/:" or c.isspace() or not c.isprintable() for c in ifname))
    try:
        cni.validate_ifname(ifname)
    except CniError as exc:
        assert not valid and exc.code == cni.INVALID_ENVIRONMENT
    else:
        assert valid
