"""containerd 1.6 (Debian) with a private configuration, driven over CRI as kubelet drives it.

kubelet does not exec CNI plugins: it asks the container runtime over CRI
(``RunPodSandbox``, ``StopPodSandbox``, ``RemovePodSandbox``) and containerd's CRI
plugin runs the plugins through libcni (go-cni). Here each :class:`Containerd` is a
"node": its own root, state and socket under a directory of the test's, its own
CNI bin and conf directories, the sandbox ("pause") image built from busybox-static
and imported with ``ctr`` (no registry is reachable), and a :class:`Cri` client of
the CRI subset in ``runtime.proto``, compiled here with grpcio-tools.

Nothing is shared with a containerd of the machine's: another socket, another
root, no ``/etc/containerd``. A sandbox's network namespace is containerd's own
(``/var/run/netns/cni-*``); :meth:`Containerd.stop` removes the pods this instance
made, then the instance, its shims and its mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
SHIM = Path("/usr/bin/containerd-shim-runc-v2")
BUSYBOX = Path("/bin/busybox")
PACKAGES = ("containerd", "runc", "busybox-static")
PAUSE_IMAGE = "netd.test/pause:1"
NAMESPACE = "k8s.io"  # containerd's namespace for CRI
PROTO = Path(__file__).with_name("runtime.proto")


class Unavailable(RuntimeError):
    """containerd or what it needs cannot be had on this machine."""


def ensure_containerd() -> None:
    """containerd, runc and busybox-static from Debian (installed when missing)."""
    missing = [p for p in (CONTAINERD, CTR, SHIM, BUSYBOX, Path("/usr/sbin/runc"))
               if not p.exists()]
    if missing and os.geteuid() == 0:
        script = Path(__file__).resolve().parents[3] / "scripts" / "install-deps"
        subprocess.run([str(script), *PACKAGES], check=False, timeout=900)
        missing = [p for p in missing if not p.exists()]
    if missing:
        raise Unavailable(f"missing {' '.join(map(str, missing))} (apt-get install "
                          f"{' '.join(PACKAGES)})")


# --- the CRI client ------------------------------------------------------------------------


def compiled(out: Path) -> tuple[ModuleType, ModuleType]:
    """``runtime_pb2`` and ``runtime_pb2_grpc`` from ``runtime.proto`` (grpcio-tools)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "runtime_pb2_grpc.py").exists():
        proc = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
             f"--python_out={out}", f"--grpc_python_out={out}", PROTO.name],
            capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise Unavailable(f"compiling the CRI subset failed (grpcio-tools): "
                              f"{proc.stderr.strip()}")
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("runtime_pb2")
        grpc_mod = importlib.import_module("runtime_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, grpc_mod


class Cri:
    """kubelet's side of CRI's RuntimeService, for pod sandboxes."""

    def __init__(self, socket: Path, pb2: ModuleType, grpc_mod: ModuleType) -> None:
        import grpc

        self.pb2 = pb2
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = grpc_mod.RuntimeServiceStub(self.channel)

    def version(self) -> Any:
        return self.stub.Version(self.pb2.VersionRequest(version="v1"), timeout=10)

    def run_pod(self, namespace: str, name: str, uid: str, log_dir: Path,
                timeout: float = 120) -> str:
        """RunPodSandbox of a pod of its own network (what kubelet sends, in short)."""
        pb2 = self.pb2
        config = pb2.PodSandboxConfig(
            metadata=pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace,
                                            attempt=0),
            hostname=name, log_directory=str(log_dir),
            labels={"io.kubernetes.pod.name": name,
                    "io.kubernetes.pod.namespace": namespace},
            linux=pb2.LinuxPodSandboxConfig(security_context=pb2.LinuxSandboxSecurityContext(
                namespace_options=pb2.NamespaceOption(network=pb2.POD, pid=pb2.POD,
                                                      ipc=pb2.POD))))
        resp = self.stub.RunPodSandbox(pb2.RunPodSandboxRequest(config=config),
                                       timeout=timeout)
        return str(resp.pod_sandbox_id)

    def status(self, pod: str, verbose: bool = False) -> Any:
        return self.stub.PodSandboxStatus(
            self.pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=verbose), timeout=30)

    def ip(self, pod: str) -> str:
        return str(self.status(pod).status.network.ip)

    def netns(self, pod: str) -> str:
        """The sandbox's network namespace path (from containerd's verbose info)."""
        return _netns_of(json.loads(self.status(pod, verbose=True).info["info"]))

    def stop_pod(self, pod: str, timeout: float = 120) -> None:
        self.stub.StopPodSandbox(self.pb2.StopPodSandboxRequest(pod_sandbox_id=pod),
                                 timeout=timeout)

    def remove_pod(self, pod: str, timeout: float = 120) -> None:
        self.stub.RemovePodSandbox(self.pb2.RemovePodSandboxRequest(pod_sandbox_id=pod),
                                   timeout=timeout)

    def pods(self) -> list[Any]:
        return list(self.stub.ListPodSandbox(self.pb2.ListPodSandboxRequest(),
                                             timeout=30).items)

    def close(self) -> None:
        self.channel.close()


def _netns_of(info: dict[str, Any]) -> str:
    for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return str(ns.get("path", ""))
    return ""


# --- the sandbox image -----------------------------------------------------------------------


def pause_image(path: Path) -> Path:
    """A docker-archive image of busybox-static that sleeps: the pod sandbox's process
    (containerd kills it with SIGKILL on StopPodSandbox, so no signal handling is
    needed)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for d in ("bin", "dev", "proc", "sys", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX.resolve()), arcname="bin/busybox")
    raw = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"], "Env": [],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "netd tests: busybox-static, sleeping"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [PAUSE_IMAGE],
                            "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in ((config_name, config), ("layer.tar", raw),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


# --- one containerd ---------------------------------------------------------------------------


def config_toml(base: Path, cni_bin: Path, cni_conf: Path) -> str:
    """containerd's version-2 configuration for a private instance under ``base``."""
    return f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
# what this machine lacks or a test needs not
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{base / 'containerd.sock'}"

[ttrpc]
  address = "{base / 'containerd.sock.ttrpc'}"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # the kernel here refuses a lower oom_score_adj than the daemon's own
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


@dataclass
class Containerd:
    """One containerd "node" under ``base``: CNI plugins linked into its bin dir, the
    conflist given to :meth:`start` as its only network."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None
    cri: Cri | None = None
    made: list[str] = field(default_factory=list)  # pod sandboxes run here

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    def start(self, conflist: dict[str, Any], plugins: dict[str, Path], image: Path,
              pb2: ModuleType, grpc_mod: ModuleType, timeout: float = 30) -> float:
        """Start it with ``conflist`` (``plugins``: name -> binary, linked into its CNI bin
        dir); the pause image imported; the seconds it took."""
        t0 = time.monotonic()
        cni_bin, cni_conf = self.base / "cni-bin", self.base / "cni-conf"
        for d in (cni_bin, cni_conf, self.base / "pods"):
            d.mkdir(parents=True, exist_ok=True)
        for name, binary in plugins.items():
            link = cni_bin / name
            link.unlink(missing_ok=True)
            link.symlink_to(binary)
        (cni_conf / "10-netd.conflist").write_text(json.dumps(conflist, indent=2))
        (self.base / "config.toml").write_text(config_toml(self.base, cni_bin, cni_conf))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(CONTAINERD), "--config", str(self.base / "config.toml")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"containerd did not start: {self.tail()}")
            time.sleep(0.02)
        self.ctr("images", "import", str(image))
        self.cri = Cri(self.socket, pb2, grpc_mod)
        while True:
            try:
                self.cri.version()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise Unavailable(f"containerd's CRI did not answer: {self.tail()}"
                                      ) from None
                time.sleep(0.05)
        return time.monotonic() - t0

    def ctr(self, *args: str) -> str:
        proc = subprocess.run([str(CTR), "--address", str(self.socket), "--namespace",
                               NAMESPACE, *args], capture_output=True, text=True,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise Unavailable(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def run_pod(self, namespace: str, name: str, uid: str) -> str:
        assert self.cri is not None
        log_dir = self.base / "pods" / uid
        log_dir.mkdir(parents=True, exist_ok=True)
        pod = self.cri.run_pod(namespace, name, uid, log_dir)
        self.made.append(pod)
        return pod

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> list[str]:
        """Its pods stopped and removed, the daemon and its shims killed, its mounts and
        directories removed; what could not be cleaned."""
        problems: list[str] = []
        if self.cri is not None and self.proc is not None and self.proc.poll() is None:
            for pod in self.made:
                for step in (self.cri.stop_pod, self.cri.remove_pod):
                    try:
                        step(pod)
                    except Exception as exc:
                        if "not found" not in str(exc):
                            problems.append(f"pod {pod[:12]}: {exc}")
            self.cri.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in reversed(self.mounts()):
            subprocess.run(["umount", "-l", mount], check=False, timeout=30)
        shutil.rmtree(self.base / "root", ignore_errors=True)
        shutil.rmtree(self.base / "state", ignore_errors=True)
        return problems

    def shims(self) -> list[int]:
        """Shim processes serving this instance (their -address is its socket)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(
                        self.socket).encode() in argv:
                    out.append(int(d.name))
        return out

    def mounts(self) -> list[str]:
        with open("/proc/self/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(
                str(self.base) + "/")]
