"""``netd agent``: run the host agent, print its plan, or show its status.

The wiring lives here, at the top: the mode's driver (from the registry),
the IPAM clients, the state, the agent's pipeline, and the integrations that
serve it (the CNI socket, the Docker plugin socket).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from netd.agent.config import AgentConfig, load_config
from netd.errors import NetdError

if TYPE_CHECKING:
    from netd.agent.service import Agent
    from netd.cni.docker_server import PluginServer

log = logging.getLogger("netd.agent")
DEFAULT_CONFIG = "/etc/netd/agent.toml"


def _config(path: str) -> AgentConfig:
    try:
        return load_config(path)
    except NetdError as exc:
        raise click.ClickException(exc.message) from None


@click.group("agent", invoke_without_command=True)
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              help="agent.toml")
@click.option("--plan", is_flag=True,
              help="print the host changes the agent would make at start, make none, exit")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def agent_cli(ctx: click.Context, config_path: str, plan: bool, log_level: str) -> None:
    """Run the host agent (request -> IPAM -> dataplane -> result)."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per IPAM call is noise
    cfg = _config(config_path)
    sys.exit(run(cfg, plan_only=plan))


def run(cfg: AgentConfig, plan_only: bool = False) -> int:
    """Wire the collaborators, prepare the host, reconcile, serve."""
    from netd.agent.ipam_http import AgentIpamClient
    from netd.agent.service import Agent
    from netd.agent.state import StateStore
    from netd.cni.handler import CniHandler
    from netd.cni.server import AgentServer
    from netd.dataplane.errors import DataplaneError
    from netd.dataplane.registry import driver_class

    driver = driver_class(cfg.mode)(cfg.driver_settings)
    if plan_only:
        for line in driver.plan():
            click.echo(line)
        return 0
    try:
        changes = driver.start()
    except DataplaneError as exc:
        log.error("%s", exc)
        click.echo(f"netd agent: {exc}", err=True)
        return 3
    for line in changes:
        log.info("host: %s", line)
    token = cfg.token()
    ipam = AgentIpamClient(cfg.ipam_url, token=token, actor=f"agent:{cfg.host}",
                           timeout=cfg.ipam_timeout)
    fast = AgentIpamClient(cfg.ipam_url, token=token, actor=f"agent:{cfg.host}",
                           timeout=min(2.0, cfg.ipam_timeout))
    state = StateStore(cfg.state_dir)
    agent = Agent(cfg, ipam, driver, state, release_ipam=fast)
    if cfg.metrics_listen is not None:
        from netd.agent.metrics import AgentMetrics

        metrics = AgentMetrics(cfg.mode)
        agent.metrics = ipam.metrics = fast.metrics = metrics
        metrics.gauges(agent.metrics_snapshot)
        try:
            metrics.serve(cfg.metrics_listen)
        except OSError as exc:
            click.echo(f"netd agent: metrics_listen {cfg.metrics_listen}: {exc.strerror}",
                       err=True)
            return 3
    agent.reconcile()  # each record alone: one that fails is kept and retried
    agent.flush_releases()
    agent.sync_quietly()  # the BGP mode's blackholes before the first ADD
    docker_server = _start_docker_plugin(cfg, agent) if cfg.docker_plugin else None
    server = AgentServer(cfg.socket, CniHandler(agent))
    stop = threading.Event()
    _background(stop, "release-flusher", 2.0, agent.flush_releases)
    _background(stop, "reconciler", cfg.reconcile_interval,
                lambda: agent.reconcile(sweep=not agent.reconciled))
    _background(stop, "ipam-sync", cfg.sync_interval, agent.sync)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()
        if docker_server is not None:
            threading.Thread(target=docker_server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("netd agent for host %s (mode %s) serving %s", cfg.host, cfg.mode, cfg.socket)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if docker_server is not None:
            docker_server.server_close()
        driver.stop()
        agent.close()
        state.close()
    return 0


def _background(stop: threading.Event, name: str, every: float, work: Any) -> None:
    """Run ``work()`` every ``every`` seconds until ``stop``; a failure is logged, not fatal."""
    def loop() -> None:
        while not stop.wait(every):
            try:
                work()
            except Exception:
                log.exception("%s failed", name)

    threading.Thread(target=loop, name=name, daemon=True).start()


def _start_docker_plugin(cfg: AgentConfig, agent: Agent) -> PluginServer:
    """Reconcile the Docker driver's records, then serve the plugin socket in a thread."""
    from netd.cni.docker_api import DockerApi
    from netd.cni.docker_driver import DockerDriver
    from netd.cni.docker_server import PluginServer

    driver = DockerDriver(agent, docker=DockerApi(cfg.docker_host))
    driver.reconcile()
    docker_server = PluginServer(cfg.docker_socket, driver)
    threading.Thread(target=docker_server.serve_forever, kwargs={"poll_interval": 0.5},
                     name="docker-plugin", daemon=True).start()
    log.info("docker plugin 'netd' serving %s", cfg.docker_socket)
    return docker_server


@agent_cli.command("status")
@click.option("--socket", "socket_path", default=None,
              help="agent socket (default: from the config)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status_cmd(config_path: str, socket_path: str | None, as_json: bool) -> None:
    """Show this host's mode, attachments and health."""
    from netd.cni.server import call

    path = socket_path or _config(config_path).socket
    try:
        answer = call(path, {"command": "AGENT_STATUS"}, timeout=10)
    except OSError as exc:
        raise click.ClickException(f"agent not reachable at {path}: {exc}") from None
    if "error" in answer:
        raise click.ClickException(answer["error"].get("msg", "agent error"))
    st = answer["result"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"host {st['host']}  mode {st['mode']}  uptime {st['uptime']}s")
    click.echo(f"ipam {st['ipam_url']}  reachable={st['ipam_reachable']}  "
               f"pending releases={st['pending_releases']}"
               + ("  docker plugin on" if st.get("docker_plugin") else ""))
    # Docker endpoints: network and endpoint ids (12 digits, as docker shows them), or the
    # container's name once dockerd has told it; Docker names the interface (ethN) itself
    rows = [("PLUGIN", "NETWORK", "CONTAINER", "IFNAME", "IP", "MAC", "HOST IF", "STATE")]
    for a in st["attachments"]:
        docker = a["plugin"] == "docker"
        rows.append((a["plugin"], a["network"][:12] if docker else a["network"],
                     a.get("name") or a["container_id"][:12], "-" if docker else a["ifname"],
                     a["ip"] or "-", a["mac"] or "-", a["host_ifname"] or "-", a["state"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for item in st.get("not_reconciled") or []:
        click.echo(f"not reconciled yet: {item['container_id'][:12]}/{item['ifname']} on "
                   f"{item['network']}: {item['error']}")
