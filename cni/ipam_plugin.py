"""``netd-ipam`` console script: the CNI IPAM plugin (see :mod:`netd.cni.shim`)."""

from __future__ import annotations

import sys

from .shim import main as shim_main


def main() -> None:
    sys.exit(shim_main("netd-ipam"))
