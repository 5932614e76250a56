"""Imports run one way, so a mode is only its driver and an integration only its edge.

    netd.cli, netd.lab                  (top: wiring, labs)
        -> netd.cni                     (integrations: CNI, Docker, install)
            -> netd.agent               (the endpoint pipeline, mode-agnostic)
                -> netd.dataplane core  (driver interface, veth, netns, netlink, ARP)
                   netd.ipam            (the client; the IPAM itself)
                      -> netd.errors, netd.files

Mode drivers (netd.dataplane.l2/l2driver, later netd.ovs, netd.bgp) sit beside the
core and are reached through the registry only. Read from the source with ast, so it
holds for code paths no test runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"netd": REPO / "netd", "netd.cni": REPO / "cni", "netd.bgp": REPO / "bgp",
         "netd.ovs": REPO / "ovs"}
MODE_MODULES = ("netd.dataplane.l2", "netd.dataplane.l2driver", "netd.ovs", "netd.bgp")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "netd" and parts and parts[0] in ("cni", "bgp", "ovs"):
                continue
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every netd module ``name`` imports (absolute, relative, and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in out if m == "netd" or m.startswith("netd.")}


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


ALL = modules()
RULES = [
    # (who, must not import)
    ("netd.dataplane", ("netd.agent", "netd.cni", "netd.cli", "netd.lab", "netd.ipam",
                        "netd.ovs", "netd.bgp")),
    ("netd.agent", ("netd.cni", "netd.cli", "netd.lab", *MODE_MODULES)),
    ("netd.cni", ("netd.cli", "netd.lab", *MODE_MODULES)),
    ("netd.ipam", ("netd.agent", "netd.dataplane", "netd.cni", "netd.cli", "netd.lab")),
    ("netd.ovs", ("netd.agent", "netd.cni", "netd.cli", "netd.lab")),
    ("netd.bgp", ("netd.agent", "netd.cni", "netd.cli", "netd.lab")),
]


def test_the_module_list_is_complete() -> None:
    assert "netd.agent.service" in ALL and "netd.cni.handler" in ALL
    assert "netd.dataplane.veth" in ALL and "netd.lab.l2" in ALL
    assert len(ALL) > 40


@pytest.mark.parametrize(("who", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_imports_run_one_way(who: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for name, path in ALL.items():
        if not under(name, who):
            continue
        # a mode's own modules may import each other (netd.dataplane.l2driver -> .l2)
        own = tuple(f for f in forbidden if not under(name, f))
        bad += [f"{name} imports {m}" for m in sorted(imports(name, path)) if under(m, *own)]
    assert not bad, "\n".join(bad)


def test_the_core_never_imports_a_mode() -> None:
    core = [n for n in ALL if under(n, "netd.dataplane") and not under(n, *MODE_MODULES)
            and n != "netd.dataplane.registry"]
    bad = [f"{n} imports {m}" for n in core for m in imports(n, ALL[n])
           if under(m, *MODE_MODULES)]
    assert not bad, "\n".join(bad)


def test_no_mode_knowledge_in_the_agent() -> None:
    """Nothing in netd/agent refers to the L2 table, a bridge or L2 helpers."""
    pattern = re.compile(r"cfg\.l2|\.l2\.|settings\.bridge|\bbridge\b|wait_forwarding|"
                         r"takeover|br0")
    bad = []
    for name, path in ALL.items():
        if under(name, "netd.agent"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_cni_shim_needs_only_the_standard_library() -> None:
    assert imports("netd.cni.shim", ALL["netd.cni.shim"]) == set()
