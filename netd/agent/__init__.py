"""The netd host agent: serves the CNI plugins, talks to the IPAM, drives the dataplane."""
