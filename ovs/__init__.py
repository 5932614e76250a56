"""OVS VLAN trunk mode: bridge/port management and the os-ken OpenFlow app.

Installed as ``netd.ovs`` (a top-level ``ovs`` would shadow the Open vSwitch
library os-ken depends on). Not implemented yet.
"""
