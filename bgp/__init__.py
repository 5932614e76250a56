"""BGP "downward default" mode (installed as ``netd.bgp``).

``driver.py``: the container plumbing, Calico style (a /32 per container, the
link-local gateway 169.254.1.1 answered by proxy ARP, strict reverse-path
filtering on the host end). The routing half (exabgp speaker, routes from the
ToRs, FRR configs for the fabric, the racks lab) follows.
"""
