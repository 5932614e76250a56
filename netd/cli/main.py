"""``netd``: the daemons' command line (IPAM server, CNI plugin installation).

Operators' day-to-day commands live in ``netctl`` (:mod:`netd.cli.netctl`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse, urlunparse

import click

from netd import __version__
from netd.cli.agent import agent_cli
from netd.cli.fabric import fabric_cli
from netd.errors import NetdError
from netd.lab import lab_cli

DEFAULT_LISTEN = "127.0.0.1:9650"
DEFAULT_STORE = "sqlite:///var/lib/netd/ipam.db"
DEFAULT_CNI_BIN = "/opt/cni/bin"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("netd")


# --- flag parsing (pure: values in, values out) --------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise click.ClickException(f"--listen: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise click.ClickException(f"--listen: {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise click.ClickException(f"--listen: {text!r}: port must be 1-65535")
    return host, int(port_text)


def parse_vlan_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise click.ClickException(f"--vlan-range: {text!r} is not LO-HI (e.g. 2-4094)")
    lo_v, hi_v = int(lo), int(hi)
    if not 1 <= lo_v <= hi_v <= 4094:
        raise click.ClickException(f"--vlan-range: {text!r}: need 1 <= LO <= HI <= 4094")
    return lo_v, hi_v


def read_token(path: Path) -> str:
    """Read and strip a token file; warn when others can read it."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read token file {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: token file {path} is accessible by group or others; "
                   f"run 'chmod 600 {path}'", err=True)
    token = text.strip()
    if not token:
        raise click.ClickException(f"token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise click.ClickException(
            f"token file {path} must hold one token without spaces or control characters")
    return token


def redact_url(url: str) -> str:
    """A store URL without user info, fit for logs."""
    parsed = urlparse(url)
    if parsed.username or parsed.password:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        return urlunparse(parsed._replace(netloc=netloc))
    return url


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot resolve listen address {host!r}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


# --- commands ------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netd")
def cli() -> None:
    """netd: container networking daemons (IPAM server, host agent, plugins)."""


@cli.group()
def ipam() -> None:
    """The central IPAM server."""


@ipam.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve HTTP on.")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True, metavar="URL",
              help="Datastore: sqlite:///PATH, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
                   "[?cacert=..&cert=..&key=..&user=..&password_file=..] (docs/ETCD.md).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token every API request must present "
                   "(/healthz, /metrics and /openapi.json stay open).")
@click.option("--read-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a second, read-only token (dashboards): it may read "
                   "everything and change nothing. Needs --token-file.")
@click.option("--cooldown", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="Released addresses rest this long before re-use.")
@click.option("--vlan-range", default="2-4094", show_default=True, metavar="LO-HI",
              help="VLANs that 'vlan: auto' pools are given from.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes sharing the listening socket and the database "
                   "(SQLite serialises their writes).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="info", show_default=True)
def serve(listen: str, store_url: str, token_file: Path | None, read_token_file: Path | None,
          cooldown: float, vlan_range: str, workers: int, log_level: str) -> None:
    """Serve the IPAM HTTP API (see docs/API.md)."""
    from netd.ipam.store import check_store_url, open_store

    host, port = parse_listen(listen)
    vlans = parse_vlan_range(vlan_range)
    try:
        if check_store_url(store_url).memory and workers > 1:
            raise click.ClickException(
                "--store sqlite://:memory: gives each worker a database of its own (the "
                "same addresses handed out twice): use a file with --workers > 1")
    except NetdError as exc:
        raise click.ClickException(f"--store: {exc.message}") from None
    token = read_token(token_file) if token_file is not None else None
    reader = read_token(read_token_file) if read_token_file is not None else None
    if reader is not None and token is None:
        raise click.ClickException("--read-token-file needs --token-file: without a token "
                                   "anyone may change what only token holders may read")
    if reader is not None and reader == token:
        raise click.ClickException("the read-only token must differ from the token")
    level = getattr(logging, log_level.upper())
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sock = bind_socket(host, port)
    try:
        open_store(store_url).close()  # creates the schema; each worker opens its own
    except (NetdError, OSError) as exc:
        sock.close()
        why = exc.message if isinstance(exc, NetdError) else str(exc)
        raise click.ClickException(f"cannot open store {redact_url(store_url)}: {why}") from None
    try:
        if token is None:
            log.warning("no --token-file: anyone who reaches the API may read and change it")
        log.info("netd ipam %s serving on http://%s:%d (store %s, %d worker%s)", __version__,
                 f"[{host}]" if ":" in host else host, port, redact_url(store_url), workers,
                 "" if workers == 1 else "s")
        if workers == 1:
            _serve_worker(sock, store_url, token, reader, cooldown, vlans, level)
        else:
            from netd.ipam.metrics import shared_between_processes

            with shared_between_processes():  # the counters: every worker's, summed
                code = _supervise(workers, lambda: _serve_worker(
                    sock, store_url, token, reader, cooldown, vlans, level))
            sys.exit(code)
        log.info("netd ipam stopped")
    finally:
        sock.close()


def _serve_worker(sock: socket.socket, store_url: str, token: str | None,
                  reader: str | None, cooldown: float, vlans: tuple[int, int],
                  level: int) -> None:
    """One server process: its own store connection, app and event loop."""
    import uvicorn

    from netd.ipam import listings
    from netd.ipam.api import create_app
    from netd.ipam.metrics import Metrics
    from netd.ipam.service import IPAM
    from netd.ipam.store import open_store

    store = open_store(store_url)
    if getattr(store, "network", False):
        # etcd's committer thread hands the next commit over the moment gRPC's thread
        # has an answer; both take the GIL from the event loop, each waiting up to the
        # switch interval (5 ms by default, about a commit's own round trip)
        sys.setswitchinterval(0.001)
    ipam = IPAM(store, cooldown=cooldown, vlan_range=vlans)
    watch_space = getattr(store, "watch_space", None)  # etcd: warn before its quota
    if watch_space is not None:
        watch_space()
    watch_pools = getattr(store, "watch_pools", None)  # etcd: other servers' pool changes
    if watch_pools is not None:
        watch_pools()
    # listing pages are built by a reader process of lower priority (a file store)
    pages = listings.for_store(ipam, store_url)
    try:
        if isinstance(pages, listings.ReaderProcess):
            pages.start()
        app = create_app(ipam, token, Metrics(), read_token=reader, listings=pages)
        have = importlib.util.find_spec
        config = uvicorn.Config(
            app,
            loop="uvloop" if have("uvloop") else "asyncio",
            http="httptools" if have("httptools") else "h11",
            access_log=False,
            log_config=None,
            log_level=level,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)

        # uvicorn handles SIGTERM/SIGINT while serving, then restores the handlers
        # it found and re-raises the signal: with these, that re-raise only asks
        # for (an already done) shutdown, so we close the store and exit 0. A
        # signal that arrives before uvicorn took over stops it right away.
        def _stop(signum: int, frame: FrameType | None) -> None:
            server.should_exit = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        server.run(sockets=[sock])
    finally:
        pages.close()
        store.close()


@ipam.command("check")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True, metavar="URL",
              help="The store to check (sqlite:///PATH or etcd://...).")
@click.option("--repair", is_flag=True,
              help="Fix what has one right answer (counters, owner indexes).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def check(store_url: str, repair: bool, as_json: bool) -> None:
    """Check a store's consistency; exit 1 when something is wrong (docs/ETCD.md)."""
    from netd.ipam.check import check_store
    from netd.ipam.store import open_store

    try:
        store = open_store(store_url)
    except NetdError as exc:
        raise click.ClickException(f"--store: {exc.message}") from None
    bar = sys.stderr.isatty() and not as_json
    try:
        report = check_store(store, repair=repair, progress=ProgressBar() if bar else None)
    except NetdError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        store.close()
    if bar:
        click.echo("\r\033[K", err=True, nl=False)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"{p.pool}: {p.what}" + ("  (repaired)" if p.repaired else ""))
        click.echo(f"{report.pools} pool(s), {report.allocations} allocation(s): "
                   + ("consistent" if not report.problems else
                      "repaired" if report.ok else
                      f"{sum(not p.repaired for p in report.problems)} problem(s)"))
    sys.exit(0 if report.ok else 1)


class ProgressBar:
    """``netd ipam check``'s bar on a terminal (stderr), redrawn at most 10 times a
    second: allocations checked of all the counters say, and the pool at hand."""

    WIDTH = 30

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, done: int, total: int, pool: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        part = done / total if total else 1.0
        filled = int(part * self.WIDTH)
        click.echo(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {part:4.0%} "
                   f"{done:,}/{total:,} allocations  pool {pool[:24]}\033[K", err=True, nl=False)


def _supervise(workers: int, run: Callable[[], None]) -> int:
    """Fork ``workers`` server processes on the bound socket; stop all when one dies.

    The kernel spreads accepted connections over the processes; SQLite's
    write lock serialises their transactions on the shared database.
    """
    children: set[int] = set()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run()
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        children.add(pid)
    stopping = False

    def _forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    status = 0
    while children:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        code = os.waitstatus_to_exitcode(wstatus)
        if not stopping:
            log.error("worker %d exited (%d); stopping the others", pid, code)
            status = 1
            _forward(signal.SIGTERM, None)
    return status


@cli.command("install-cni")
@click.option("--bin-dir", default=DEFAULT_CNI_BIN, show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="CNI plugin directory to install netd-cni and netd-ipam into.")
@click.option("--python", "python", metavar="PATH",
              help="Interpreter that runs the plugins "
                   "[default: /usr/bin/python3, else this netd's python].")
@click.option("--native/--no-native", default=True, show_default=True,
              help="Build the plugins' native fast path with the C compiler (cc) when "
                   "there is one; --no-native installs the Python plugin alone.")
@click.option("--static", is_flag=True,
              help="Link the native front statically: the plugins run on a host whose C "
                   "library is not this one's (a DaemonSet's init container).")
@click.option("--conf-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the network's conflist (10-netd.conflist) here, e.g. "
                   "/etc/cni/net.d (needs --pool).")
@click.option("--pool", help="The IPAM pool of the conflist's network (this node's).")
@click.option("--network", default="netd", show_default=True,
              help="The conflist's network name.")
@click.option("--agent-socket", default="/run/netd/agent.sock", show_default=True,
              help="The node's agent socket, as the plugin reaches it.")
@click.option("--cni-version", default="1.0.0", show_default=True,
              type=click.Choice(["0.4.0", "1.0.0", "1.1.0"]),
              help="The conflist's cniVersion: 1.0.0 for containerd 1.6 and CRI-O; 1.1.0 "
                   "for podman 4 and containerd 1.7+.")
def install_cni(bin_dir: Path, python: str | None, native: bool, static: bool,
                conf_dir: Path | None,
                pool: str | None, network: str, agent_socket: str, cni_version: str) -> None:
    """Install the netd-cni and netd-ipam CNI plugins.

    With a C compiler, each is a small native program that forwards the
    common requests to the agent itself and hands everything else to the
    Python plugin (netd/cni/shim.py, precompiled and embedded), so an ADD
    or DEL costs no interpreter start. Without one (or --no-native), each
    is the Python plugin alone: one self-contained file run by 'python3 -IS',
    precompiled, so an exec neither compiles the plugin nor loads netd or
    site-packages. Atomic and idempotent.
    """
    from netd.cni import install as cni_install

    if conf_dir is not None and not pool:
        raise click.UsageError("--conf-dir writes a conflist: name its --pool")
    try:  # checked before anything is written
        doc = (cni_install.conflist(network, pool, agent_socket, cni_version)
               if conf_dir is not None and pool else None)
    except cni_install.InstallError as exc:
        raise click.UsageError(str(exc)) from None
    if native and cni_install.find_cc() is None:
        click.echo("no C compiler (cc): installing the Python plugin alone", err=True)
    try:
        done = cni_install.install(bin_dir, python, native=native, static=static)
        if conf_dir is not None and doc is not None:
            done.append(cni_install.write_conflist(conf_dir, doc))
    except cni_install.InstallError as exc:
        raise click.ClickException(str(exc)) from None
    for item in done:
        click.echo(str(item))


cli.add_command(lab_cli)
cli.add_command(agent_cli)
cli.add_command(fabric_cli)


def main() -> None:
    cli(prog_name="netd")


if __name__ == "__main__":
    main()
