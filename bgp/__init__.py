"""BGP "downward default" mode: exabgp speaker, route programming, FRR lab configs.

Installed as ``netd.bgp``. Not implemented yet.
"""
