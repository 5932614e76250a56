"""``netd lab``: a data centre in network namespaces, for tests, demos and trials.

One module per mode builds that mode's topology (:mod:`netd.lab.l2`: a switch,
the gateway with the IPAM, hosts whose uplink is a veth named ``bond0``);
:mod:`netd.lab.base` does what every mode shares (plan, manifest, IPAM,
agents, podman networks, up/down/status); :mod:`netd.lab.docker` runs a
dockerd in a lab host; :mod:`netd.lab.cli` is the command line.

The lab never touches the machine's own interfaces: every link, address and
route lives in its namespaces, named with its prefix.
"""

from netd.dataplane.netns import list_netns
from netd.lab.base import (
    DEFAULT_DIR,
    IPAM_PORT,
    MODES,
    NETNS_DIR,
    HostPlan,
    LabError,
    LabPlan,
    http_status_in_netns,
    in_netns,
    lab_down,
    lab_status,
    lab_up,
    load_manifest,
    plan_lab,
    save_manifest,
)
from netd.lab.cli import lab_cli
from netd.lab.l2 import GATEWAY, IPAM_ADDRESS, POOL, SUBNET
from netd.lab.procs import alive, start_process, tail

__all__ = [
    "DEFAULT_DIR",
    "GATEWAY",
    "IPAM_ADDRESS",
    "IPAM_PORT",
    "MODES",
    "NETNS_DIR",
    "POOL",
    "SUBNET",
    "HostPlan",
    "LabError",
    "LabPlan",
    "alive",
    "http_status_in_netns",
    "in_netns",
    "lab_cli",
    "lab_down",
    "lab_status",
    "lab_up",
    "list_netns",
    "load_manifest",
    "plan_lab",
    "save_manifest",
    "start_process",
    "tail",
]
