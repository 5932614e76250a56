"""CNI plugins (``netd-cni``, ``netd-ipam``) and the Docker remote driver.

Installed as ``netd.cni``. The plugins are thin shims that forward to the
host agent over its unix socket.
"""
