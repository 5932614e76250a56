"""The process exabgp runs for the agent: its stdin/stdout bridged to the agent's socket.

``python -m netd.bgp.relay SOCKET``. exabgp talks to "its" processes over their
stdin and stdout; the agent is not exabgp's child, so this relay connects to
the agent's speaker socket (root only) and copies lines both ways: exabgp's
events to the agent, the agent's commands to exabgp. It exits when either side
closes, which exabgp sees as its process ending.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _to_exabgp(sock: socket.socket) -> None:
    """The agent's commands -> our stdout (exabgp reads them)."""
    try:
        while chunk := sock.recv(65536):
            os.write(1, chunk)
    except OSError:
        pass
    os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m netd.bgp.relay SOCKET", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(argv[0])
    threading.Thread(target=_to_exabgp, args=(sock,), daemon=True).start()
    try:
        while chunk := os.read(0, 65536):  # exabgp's events and answers -> the agent
            sock.sendall(chunk)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
