"""netd: container networking for bare-metal fleets.

Central IPAM (netd.ipam), host agent, and three dataplanes: Linux bridge over
bond0 (L2), Open vSwitch VLAN trunks (netd.ovs), and downward-default BGP
(netd.bgp). Nothing here does I/O at import time.
"""

__version__ = "0.1.0"
