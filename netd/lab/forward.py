"""``netd lab forward``: a loopback port of this machine to the lab's IPAM server.

The lab's IPAM listens inside its own namespace (198.18.0.2:9650 exists only
there), so a browser on the machine cannot reach the web view. This forwards
``127.0.0.1:PORT`` to it: each connection's far end is opened inside the
namespace (the socket stays there), bytes are copied both ways. Loopback only,
and only to the one address the lab names; nothing is added to any interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from netd.dataplane.netns import run_in_netns


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: tuple[str, int], netns: str, target: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()

    def far() -> socket.socket:
        return run_in_netns(netns, lambda: socket.create_connection(target, timeout=5))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await loop.run_in_executor(None, far)
        except OSError:
            writer.close()
            return
        sock.setblocking(False)
        far_reader, far_writer = await asyncio.open_connection(sock=sock)
        await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))

    server = await asyncio.start_server(handle, listen[0], listen[1])
    async with server:
        await server.serve_forever()


def run(listen: tuple[str, int], netns: str, target: tuple[str, int]) -> None:
    if listen[0] not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("netd lab forward listens on loopback only")
    asyncio.run(serve(listen, netns, target))
