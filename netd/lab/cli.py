"""``netd lab up|status|down``: the command line of the lab (:mod:`netd.lab.base`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from netd.lab.base import (
    DEFAULT_CNI_BIN_DIR,
    DEFAULT_CNI_CONF_DIR,
    DEFAULT_DIR,
    DEFAULT_PREFIX,
    DOCKER_ON,
    MODES,
    format_status,
    lab_down,
    lab_status,
    lab_up,
    load_manifest,
    plan_lab,
    validate_prefix,
)

MAX_HOSTS = max(m.MAX_HOSTS for m in MODES.values())



def _dir_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_DIR, show_default=True,
                        help="Lab state: manifest, IPAM store, token, agent configs and logs.")


@click.group("lab")
def lab_cli() -> None:
    """A data centre in network namespaces: switch, gateway, IPAM, hosts with agents."""


@lab_cli.command("up")
@click.option("--mode", type=click.Choice(list(MODES)), default="l2", show_default=True)
@click.option("--hosts", type=click.IntRange(1, MAX_HOSTS), default=2, show_default=True)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Name prefix of every namespace, link and podman network.")
@_dir_option()
@click.option("--agents/--no-agents", default=True, show_default=True,
              help="Start 'netd agent' in every host namespace.")
@click.option("--install-cni/--no-install-cni", default=True, show_default=True,
              help="Install netd-cni and netd-ipam into --cni-bin-dir.")
@click.option("--cni-bin-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_BIN_DIR, show_default=True)
@click.option("--cni-conf-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_CONF_DIR, show_default=True,
              help="Where the per-host podman network conflists go.")
@click.option("--cooldown", type=click.FloatRange(min=0), default=None,
              help="IPAM: seconds a released address rests (server default when unset).")
@click.option("--racks", type=click.IntRange(1, 9), default=None,
              help="--mode bgp: racks of hosts, each with its ToR(s) [default: 2].")
@click.option("--hosts-per-rack", type=click.IntRange(1, 20), default=None,
              help="--mode bgp: hosts in each rack [default: 2] (--hosts is ignored).")
@click.option("--dual-homed", is_flag=True,
              help="--mode bgp: two ToRs per rack, every host peering with both.")
@click.option("--docker", is_flag=True,
              help=f"Start a dockerd in {DOCKER_ON}'s namespace (Debian docker.io) and have "
                   f"{DOCKER_ON}'s agent serve the Docker plugin 'netd' for it.")
@click.option("--docker-host", default=None, metavar="unix:///PATH",
              help=f"Have {DOCKER_ON}'s agent serve the Docker plugin 'netd' for a dockerd "
                   "you start (in its namespace) with this socket.")
@click.option("--store", type=click.Choice(["sqlite", "etcd"]), default="sqlite",
              show_default=True,
              help="The IPAM's store: a SQLite file, or a 3-member etcd in the IPAM's "
                   "namespace (Debian etcd-server).")
@click.option("--keep-on-failure", is_flag=True, help="Leave a half-built lab for debugging.")
def up_cmd(mode: str, hosts: int, prefix: str, directory: Path, agents: bool,
           install_cni: bool, cni_bin_dir: Path, cni_conf_dir: Path, cooldown: float | None,
           racks: int | None, hosts_per_rack: int | None, dual_homed: bool,
           docker: bool, docker_host: str | None, store: str,
           keep_on_failure: bool) -> None:
    """Build the lab (a previous one with the same prefix is removed first)."""
    plan = plan_lab(prefix, hosts, directory, mode, cni_conf_dir, docker=docker,
                    docker_host=docker_host, racks=racks, hosts_per_rack=hosts_per_rack,
                    dual_homed=dual_homed, store=store)
    manifest = lab_up(plan, agents=agents, install_cni=install_cni, cni_bin_dir=cni_bin_dir,
                      cooldown=cooldown, keep_on_failure=keep_on_failure)
    impl = plan.impl
    def pool_text(p: dict[str, Any]) -> str:
        vlan = f" VLAN {p['vlan']}" if p.get("vlan") else ""
        gw = f" (gateway {p['gateway']})" if p.get("gateway") else " (a block per host)"
        return f"{p['name']} {p['cidr']}{vlan}{gw}"

    pools = ", ".join(pool_text(p) for p in manifest["pools"])
    click.echo(f"lab {plan.prefix} up in {manifest['up_seconds']}s: IPAM {plan.ipam_url} "
               f"in {plan.ipam_ns}, pool{'s' if len(manifest['pools']) > 1 else ''} {pools}")
    for h in plan.hosts:
        agent = (f"agent pid {manifest['hosts'][h.index - 1]['agent']['pid']}" if agents
                 else "no agent")
        nets = [n.name for n in h.networks] or [h.network]
        click.echo(f"  {h.name}: netns {h.netns}, {impl.UPLINK} {h.address}, {agent}, "
                   f"podman network{'s' if len(nets) > 1 else ''} {', '.join(nets)}")
    if plan.docker_host:
        started = "the lab's dockerd" if plan.start_dockerd else "your dockerd"
        click.echo(f"  docker: {DOCKER_ON}'s agent serves plugin netd for {started} at "
                   f"{plan.docker_host}")
        click.echo(f"try: docker -H {plan.docker_host} network create -d netd --ipam-driver "
                   f"netd --ipam-opt pool={impl.POOL} --subnet {impl.SUBNET} NAME")
    click.echo(f"try: podman run -d --network {plan.hosts[0].network} --cap-add NET_RAW "
               f"--rootfs DIR sleep 300; netd lab status --dir {plan.dir}")


@lab_cli.command("status")
@_dir_option()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ping/--no-ping", default=True, show_default=True,
              help="Ping every container and the gateway from every container.")
def status_cmd(directory: Path, as_json: bool, ping: bool) -> None:
    """Hosts, IPAM, containers and the reachability matrix."""
    status = lab_status(directory, ping=ping)
    click.echo(json.dumps(status, indent=2, sort_keys=True) if as_json
               else format_status(status))


@lab_cli.command("down")
@click.option("--prefix", default=None,
              help=f"Lab to remove (default: the manifest's, else {DEFAULT_PREFIX}).")
@_dir_option()
@click.option("--cni-conf-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_CONF_DIR, show_default=True)
def down_cmd(prefix: str | None, directory: Path, cni_conf_dir: Path) -> None:
    """Remove everything the lab made (also after a crash)."""
    if prefix is not None:
        validate_prefix(prefix)
    removed = lab_down(directory, prefix, cni_conf_dir=cni_conf_dir)
    for line in removed:
        click.echo(f"removed {line}")
    click.echo("lab down" if removed else "nothing to remove")


@lab_cli.command("forward")
@_dir_option()
@click.option("--port", type=click.IntRange(1024, 65535), default=9650, show_default=True,
              help="The loopback port (127.0.0.1) to serve the lab's IPAM on.")
def forward_cmd(directory: Path, port: int) -> None:
    """Serve the lab's IPAM (its API and web view, /ui/) on 127.0.0.1:PORT until stopped."""
    from netd.lab import forward

    manifest = load_manifest(directory)
    if manifest is None:
        raise click.ClickException(f"no lab in {directory} (netd lab up)")
    url = str(manifest.get("ipam_url") or "")
    host, _, port_text = url.removeprefix("http://").rstrip("/").rpartition(":")
    netns = (manifest.get("ipam") or {}).get("netns")  # where the lab started the server
    if not host or not port_text.isdigit() or netns is None:
        raise click.ClickException(f"the lab in {directory} names no IPAM to forward to")
    click.echo(f"http://127.0.0.1:{port}/ui/ -> {url} in {netns}", err=True)
    try:
        forward.run(("127.0.0.1", port), netns, (host, int(port_text)))
    except OSError as exc:
        raise click.ClickException(f"127.0.0.1:{port}: {exc.strerror}") from None

