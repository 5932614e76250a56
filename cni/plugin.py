"""``netd-cni``: the main CNI plugin (forwards to the host agent).

Not implemented yet: it lands with the host-agent issue. Until then it answers
every command with a CNI error so a runtime shows a clear reason.
"""

from __future__ import annotations

import json
import sys

NOT_YET = 100


def _not_yet(name: str) -> int:
    err = {
        "cniVersion": "1.0.0",
        "code": NOT_YET,
        "msg": f"{name} is not available yet",
        "details": "the netd host agent and CNI plugins land with the host-agent issue",
    }
    sys.stdout.write(json.dumps(err) + "\n")
    return 1


def main() -> None:
    sys.exit(_not_yet("netd-cni"))
