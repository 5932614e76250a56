"""``netd-ipam``: the CNI IPAM plugin (forwards to the host agent). Not yet."""

from __future__ import annotations

import sys

from .plugin import _not_yet


def main() -> None:
    sys.exit(_not_yet("netd-ipam"))
