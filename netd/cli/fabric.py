"""``netd fabric config``: the FRR configurations of the ToRs and the core (BGP mode)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import click

from netd.errors import NetdError


@click.group("fabric")
def fabric_cli() -> None:
    """The BGP fabric: what operators configure on their switches."""


@fabric_cli.command("config")
@click.argument("description", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write one FILE.conf per router here (default: print all).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Have FRR's vtysh parse each file (vtysh -C), when it is installed.")
def config_cmd(description: Path, out_dir: Path | None, check: bool) -> None:
    """FRR configurations for the core and every ToR, from DESCRIPTION (TOML)."""
    from netd.bgp.fabric import configs, parse_fabric

    try:
        with description.open("rb") as f:
            doc = tomllib.load(f)
        files = configs(parse_fabric(doc))
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{description}: not TOML: {exc}") from None
    except NetdError as exc:
        raise click.ClickException(f"{description}: {exc.message}") from None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_text(text)
    else:
        for name, text in files.items():
            click.echo(f"### {name}\n{text}")
    if check and shutil.which("vtysh"):
        for name, text in files.items():
            path = out_dir / name if out_dir is not None else None
            proc = subprocess.run(["vtysh", "-C", "-f", str(path) if path else "/dev/stdin"],
                                  input=None if path else text, capture_output=True,
                                  text=True, timeout=60, check=False)
            if proc.returncode != 0:
                raise click.ClickException(f"FRR refuses {name}: "
                                           f"{(proc.stdout + proc.stderr).strip()}")
        click.echo(f"vtysh -C: {len(files)} file(s) accepted", err=True)
    elif out_dir is not None:
        click.echo(f"wrote {', '.join(sorted(files))} to {out_dir}", err=True)
