"""nftables through libnftables, in process: one context per network namespace.

The ``nft`` command costs ~10 ms an exec here (a process, a netlink socket, a
cache fetch); libnftables, the library ``nft`` is built on (Debian
``libnftables1``, installed with ``nftables``), does the same transaction in
~1 ms from this process, and a whole script is applied atomically: all of it
or nothing. So netd speaks nftables' own language (a script of commands, the
``nft -f`` syntax) to the library through ctypes, with no shell and no exec.

A context's netlink socket lives in the namespace it was made in, so each
:class:`Nft` is made inside its namespace and used from any thread, one
command at a time (a lock).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

from netd.dataplane.errors import DataplaneError
from netd.dataplane.netns import run_in_netns

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftUnavailable(DataplaneError):
    """libnftables is not installed (Debian package ``nftables``)."""

    code = "nft_unavailable"


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                raise NftUnavailable(f"libnftables is missing ({exc}): install the Debian "
                                     "package nftables") from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


def available() -> bool:
    try:
        _library()
    except NftUnavailable:
        return False
    return True


class Nft:
    """A libnftables context in one network namespace (None: this process's)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        lib = _library()
        ctx = run_in_netns(netns, lambda: lib.nft_ctx_new(NFT_CTX_DEFAULT))
        if not ctx:
            raise DataplaneError("nft_ctx_new failed")
        self._lib = lib
        self._ctx = ctx
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, script: str, *, json_output: bool = False) -> str:
        """Apply a script (``nft -f`` syntax) in one transaction; its output.

        Raises :class:`DataplaneError` with nftables' own message when it
        refuses; nothing of a refused script is applied.
        """
        with self._lock:
            if not self._ctx:
                raise DataplaneError("nftables context is closed")
            self._lib.nft_ctx_output_set_flags(self._ctx,
                                               NFT_CTX_OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            first = " ".join(err.strip().splitlines()[:3]) or f"error {rc}"
            raise DataplaneError(f"nftables refused: {first}")
        return out

    def json(self, command: str) -> list[dict[str, Any]]:
        """A ``list ...`` command's objects (``nft -j``); [] when there is nothing."""
        out = self.run(command, json_output=True)
        if not out.strip():
            return []
        doc = json.loads(out)
        return [o for o in doc.get("nftables", []) if isinstance(o, dict)]


__all__ = ["Nft", "NftUnavailable", "available"]
