"""OVS VLAN trunk mode (``netd.ovs``): the driver, OVSDB through ovsdbapp, OpenFlow.

Installed as ``netd.ovs``. When the repository's root is on ``sys.path``
(pytest puts it there for the ``tests`` package; ``python -m`` from a
checkout), this directory is also importable as a top-level ``ovs`` and would
shadow the Open vSwitch library (``ovs.db``, ``ovs.poller``) that ovsdbapp and
os-ken import. Imported under that name, it loads the real library in its
place instead.
"""

from __future__ import annotations

if __name__ == "ovs":  # pragma: no cover - depends on how the interpreter was started
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("ovs", _path)
    if _spec is None or _spec.loader is None:
        raise ImportError("the Open vSwitch Python library (pip package ovs) is not installed")
    _lib = importlib.util.module_from_spec(_spec)
    sys.modules["ovs"] = _lib
    _spec.loader.exec_module(_lib)
