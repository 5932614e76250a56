"""``netd-cni`` console script: the main CNI plugin (see :mod:`netd.cni.shim`).

The plugin itself is ``shim.py``; ``netd install-cni`` installs it (precompiled,
behind a native fast path when it can build one) into a CNI bin directory,
where it runs without this package. This entry point runs the same code from
the installed package.
"""

from __future__ import annotations

import sys

from .shim import main as shim_main


def main() -> None:
    sys.exit(shim_main("netd-cni"))
