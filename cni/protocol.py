"""CNI protocol, pure: versions, request validation, results and their conversion.

Values in, values out; nothing here touches the system (the agent checks that
a netns exists, code 3). See docs/AGENT.md for the contract and the CNI spec
(containernetworking/cni SPEC.md) for the formats:

- :func:`parse_request` turns one forwarded plugin run (plugin kind, command,
  CNI_* environment, network config) into a :class:`CniRequest` or raises
  :class:`CniError` with the spec's code.
- :func:`build_result` / :func:`build_ipam_result` make a result in the current
  (1.1.0) shape; :func:`convert` turns any result into another supported
  version, as libcni's converters do (0.3.x/0.4.0 ips carry ``"version"``).
- :func:`compare_prev_result` is CHECK's half that needs no system access.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

# --- versions, names ----------------------------------------------------------------

SUPPORTED_VERSIONS: Final[tuple[str, ...]] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION: Final = "1.1.0"
DEFAULT_VERSION: Final = LATEST_VERSION  # for answers when the request has no usable version
LEGACY_RESULT_VERSIONS: Final[tuple[str, ...]] = ("0.3.0", "0.3.1", "0.4.0")

PLUGIN_CNI: Final = "netd-cni"
PLUGIN_IPAM: Final = "netd-ipam"
PLUGINS: Final[tuple[str, ...]] = (PLUGIN_CNI, PLUGIN_IPAM)
COMMANDS: Final[tuple[str, ...]] = ("ADD", "DEL", "CHECK", "STATUS", "GC")
MIN_VERSION: Final[Mapping[str, str]] = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
DEFAULT_AGENT_SOCKET: Final = "/run/netd/agent.sock"
VALID_ATTACHMENTS_KEY: Final = "cni.dev/valid-attachments"
LEGACY_ATTACHMENTS_KEY: Final = "cni.dev/attachments"  # the name a spec draft used
IFNAME_MAX: Final = 15  # bytes (IFNAMSIZ 16 with the NUL)
CONTAINER_ID_MAX: Final = 200
DNS_KEYS: Final[tuple[str, ...]] = ("nameservers", "domain", "search", "options")

# --- error codes (CNI spec; 100+ are netd's, docs/AGENT.md) ---------------------------

INCOMPATIBLE_VERSION: Final = 1
UNSUPPORTED_FIELD: Final = 2
UNKNOWN_CONTAINER: Final = 3
INVALID_ENVIRONMENT: Final = 4
IO_FAILURE: Final = 5
DECODING_FAILURE: Final = 6
INVALID_CONFIG: Final = 7
TRY_AGAIN_LATER: Final = 11
PLUGIN_NOT_AVAILABLE: Final = 50  # STATUS: cannot serve ADDs
INTERNAL: Final = 100
POOL_NOT_FOUND: Final = 101
POOL_EXHAUSTED: Final = 102
ADDRESS_IN_USE: Final = 103
DATAPLANE_FAILURE: Final = 104
IPAM_REFUSED: Final = 105
INTERFACE_IN_USE: Final = 106  # the container has this interface name on another network
# CHECK found the plumbing not as recorded: the dataplane is not what it should be.
CHECK_FAILED: Final = DATAPLANE_FAILURE

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class CniError(Exception):
    """A CNI error: ``code``, ``msg`` and ``details`` as the spec prints them."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg

    def __repr__(self) -> str:
        return f"CniError({self.code!r}, {self.msg!r}, {self.details!r})"

    def to_dict(self, cni_version: str = DEFAULT_VERSION) -> dict[str, Any]:
        """The error document a plugin prints: cniVersion, code, msg, details."""
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg,
                "details": self.details}


class GcAttachment(NamedTuple):
    """One entry of ``cni.dev/valid-attachments``; compares equal to its tuple."""

    container_id: str
    ifname: str


@dataclass(frozen=True)
class CniRequest:
    """One validated plugin run.

    ``container_id``, ``ifname`` and ``netns`` are "" where the command does
    not carry them (STATUS, GC; ``netns`` may be "" on DEL). ``prev_result``
    is the config's ``prevResult`` converted to the 1.1.0 shape.
    ``valid_attachments`` is GC's list of attachments to keep (() otherwise;
    a GC request without the key is refused, so () really means "none").
    """

    plugin: str
    command: str
    cni_version: str
    network: str
    pool: str
    agent_socket: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    cni_path: str = ""
    prev_result: dict[str, Any] | None = None
    valid_attachments: tuple[GcAttachment, ...] = ()
    runtime_config: dict[str, Any] = field(default_factory=dict)
    dns: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ipam(self) -> bool:
        return self.plugin == PLUGIN_IPAM

    @property
    def owner(self) -> tuple[str, str]:
        """The IPAM owner of the address: (container id, ifname)."""
        return (self.container_id, self.ifname)

    @property
    def k8s_pod(self) -> str | None:
        """``NS/NAME`` from K8S_POD_NAMESPACE / K8S_POD_NAME in CNI_ARGS."""
        ns, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return f"{ns}/{name}" if ns and name else None

    @property
    def handle(self) -> str | None:
        """Stable handle for fixed addresses: NETD_HANDLE, else the pod's NS/NAME."""
        return self.args.get("NETD_HANDLE") or self.k8s_pod

    @property
    def labels(self) -> dict[str, str]:
        """IPAM labels: ``netd.network``, and ``k8s.pod`` when known."""
        out = {"netd.network": self.network}
        if self.k8s_pod:
            out["k8s.pod"] = self.k8s_pod
        return out


# --- versions ------------------------------------------------------------------------


def version_key(version: str) -> tuple[int, ...]:
    """``"0.4.0"`` -> (0, 4, 0); ValueError when not dotted numbers."""
    parts = version.split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a CNI version: {version!r}")
    return tuple(int(p) for p in parts)


def _supported_text() -> str:
    return "[" + " ".join(SUPPORTED_VERSIONS) + "]"


def negotiate_version(config: Mapping[str, Any]) -> str:
    """The cniVersion to speak for ``config``.

    ``cniVersion`` is what the runtime expects results in, so it decides when
    present. Without it, the highest supported entry of ``cniVersions`` (CNI
    1.1 version negotiation) is used.
    """
    version = config.get("cniVersion")
    if version is not None and not isinstance(version, str):
        raise CniError(INVALID_CONFIG, "invalid network config: cniVersion must be a string")
    if version:
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                           f'config is "{version}", plugin supports {_supported_text()}')
        return version
    versions = config.get("cniVersions")
    if versions is None:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'the network config has no "cniVersion"; plugin supports '
                       f"{_supported_text()}")
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise CniError(INVALID_CONFIG,
                       "invalid network config: cniVersions must be a list of strings")
    usable: list[str] = [v for v in versions if v in SUPPORTED_VERSIONS]
    if not usable:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config supports {versions}, plugin supports {_supported_text()}")
    return max(usable, key=version_key)


# --- environment -----------------------------------------------------------------------


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``) -> dict; empty pairs are skipped."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_ARGS pair {pair!r}",
                           "CNI_ARGS must be KEY=VALUE pairs separated by ';'")
        out[key.strip()] = value.strip()
    return out


def validate_container_id(container_id: str) -> None:
    """The spec's characters, and at most :data:`CONTAINER_ID_MAX` of them.

    The limit is what every part of an attachment can hold: the IPAM takes 255
    characters, the host end's alias (``netd:<scope>:<id>:<ifname>``, 255 bytes)
    about 218; container ids of runtimes are 64.
    """
    if len(container_id) > CONTAINER_ID_MAX:
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_CONTAINERID {container_id[:40]!r}...",
                       f"it is longer than {CONTAINER_ID_MAX} characters")
    if not _ID_RE.fullmatch(container_id):
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_CONTAINERID {container_id!r}",
                       "it must start with a letter or digit, followed by letters, digits, "
                       "'_', '.' or '-'")


def validate_ifname(ifname: str) -> None:
    """Linux interface name rules, as the spec states them."""
    why = ""
    if not ifname:
        why = "it is empty"
    elif len(ifname.encode("utf-8", "replace")) > IFNAME_MAX:
        why = f"it is longer than {IFNAME_MAX} bytes"
    elif ifname in (".", ".."):
        why = "'.' and '..' are not interface names"
    elif "/" in ifname or ":" in ifname or any(c.isspace() for c in ifname):
        why = "it must not contain '/', ':' or whitespace"
    elif any(not c.isprintable() for c in ifname):
        why = "it must not contain control characters"
    if why:
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_IFNAME {ifname!r}", why)


def validate_network_name(name: str) -> None:
    if not _ID_RE.fullmatch(name):
        raise CniError(INVALID_CONFIG, f"invalid network name {name!r}",
                       "it must start with a letter or digit, followed by letters, digits, "
                       "'_', '.' or '-'")


# --- config ------------------------------------------------------------------------------


def parse_valid_attachments(config: Mapping[str, Any]) -> tuple[GcAttachment, ...] | None:
    """GC's ``cni.dev/valid-attachments`` (or the older ``cni.dev/attachments``).

    None when neither key is there; ``null`` (libcni's empty list) gives ().
    """
    key = VALID_ATTACHMENTS_KEY if VALID_ATTACHMENTS_KEY in config else LEGACY_ATTACHMENTS_KEY
    if key not in config:
        return None
    items = config[key]
    if items is None:
        return ()
    if not isinstance(items, list):
        raise CniError(INVALID_CONFIG, f"invalid network config: {key} must be a list")
    out: dict[GcAttachment, None] = {}
    for i, item in enumerate(items):
        cid = item.get("containerID") if isinstance(item, dict) else None
        ifname = item.get("ifname") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not cid or not isinstance(ifname, str) or not ifname:
            raise CniError(INVALID_CONFIG, f"invalid network config: {key}[{i}]",
                           'each entry needs "containerID" and "ifname" strings')
        out[GcAttachment(cid, ifname)] = None
    return tuple(out)


def _parse_dns(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise CniError(INVALID_CONFIG, f"invalid network config: {where} must be an object")
    out: dict[str, Any] = {}
    for key in DNS_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if key == "domain":
            if not isinstance(value, str):
                raise CniError(INVALID_CONFIG, f"invalid network config: {where}.domain "
                                               "must be a string")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CniError(INVALID_CONFIG, f"invalid network config: {where}.{key} "
                                           "must be a list of strings")
        if value:
            out[key] = list(value) if isinstance(value, list) else value
    return out


def _string_env(env: Mapping[str, Any], name: str) -> str:
    value = env.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CniError(INVALID_ENVIRONMENT, f"invalid {name}: not a string")
    return value


def parse_request(plugin: str, command: str, env: Mapping[str, Any],
                  config: Any) -> CniRequest:
    """Validate one forwarded plugin run; raise :class:`CniError` with the spec's code.

    Order as in libcni's skel: required environment (4), decoding (6) and
    version (1), then the values themselves (4 for CNI_* values, 7 for the
    network config). The netns path is not checked here (the agent: code 3).
    """
    if plugin not in PLUGINS:
        raise CniError(INVALID_ENVIRONMENT, f"unknown plugin {plugin!r}",
                       f"expected one of {', '.join(PLUGINS)}")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}",
                       f"the agent serves {', '.join(COMMANDS)}")
    if not isinstance(env, Mapping):
        raise CniError(INVALID_ENVIRONMENT, "invalid request: env must be an object")
    container_id = _string_env(env, "CNI_CONTAINERID")
    ifname = _string_env(env, "CNI_IFNAME")
    netns = _string_env(env, "CNI_NETNS")
    needed = {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname}
    if command in ("ADD", "CHECK"):
        needed["CNI_NETNS"] = netns
    if command in ("ADD", "DEL", "CHECK"):
        missing = [k for k, v in needed.items() if not v]
        if missing:
            raise CniError(INVALID_ENVIRONMENT,
                           f"required env variables [{', '.join(missing)}] missing")
    else:  # STATUS, GC: no attachment
        container_id = ifname = netns = ""

    if not isinstance(config, dict):
        raise CniError(DECODING_FAILURE, "cannot decode the network config",
                       f"expected a JSON object, got {type(config).__name__}")
    cni_version = negotiate_version(config)
    least = MIN_VERSION.get(command)
    if least is not None and version_key(cni_version) < version_key(least):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'{command} needs cniVersion {least} or later, config is "{cni_version}"')

    if container_id:
        validate_container_id(container_id)
    if command in ("ADD", "DEL", "CHECK"):
        validate_ifname(ifname)
    args = parse_cni_args(_string_env(env, "CNI_ARGS"))

    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(INVALID_CONFIG, 'invalid network config: "name" is missing',
                       "the network name must be a non-empty string")
    validate_network_name(name)

    if plugin == PLUGIN_IPAM:
        section = config.get("ipam")
        if not isinstance(section, dict):
            raise CniError(INVALID_CONFIG, 'invalid network config: "ipam" is missing',
                           'netd-ipam needs "ipam": {"type": "netd-ipam", "pool": "POOL"}')
        where = "ipam."
    else:
        section = config
        where = ""
    pool = section.get("pool")
    if not isinstance(pool, str) or not pool.strip():
        raise CniError(INVALID_CONFIG, f'invalid network config: "{where}pool" is missing',
                       f'"{where}pool" must name a netd IPAM pool (a non-empty string)')
    agent_socket = section.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(agent_socket, str) or not agent_socket:
        raise CniError(INVALID_CONFIG,
                       f'invalid network config: "{where}agentSocket" must be a socket path')
    dns = _parse_dns(section.get("dns"), f"{where}dns")

    runtime_config = config.get("runtimeConfig", {})
    if not isinstance(runtime_config, dict):
        raise CniError(INVALID_CONFIG, "invalid network config: runtimeConfig must be an object")

    prev_result: dict[str, Any] | None = None
    try:
        prev_result = _parse_prev_result(config.get("prevResult"), cni_version)
    except CniError:
        if command == "CHECK":
            raise
        # ADD and DEL do not use it, and a DEL must not fail on it
    if command == "CHECK" and prev_result is None:
        raise CniError(INVALID_CONFIG, "required prevResult missing",
                       "CHECK needs the result of the ADD in prevResult")

    valid: tuple[GcAttachment, ...] = ()
    if command == "GC":
        listed = parse_valid_attachments(config)
        if listed is None:
            raise CniError(INVALID_CONFIG, f"invalid network config: GC needs "
                                           f"{VALID_ATTACHMENTS_KEY}",
                           "without the list of valid attachments nothing is collected")
        valid = listed

    return CniRequest(
        plugin=plugin, command=command, cni_version=cni_version, network=name, pool=pool,
        agent_socket=agent_socket, container_id=container_id, netns=netns, ifname=ifname,
        args=args, cni_path=_string_env(env, "CNI_PATH"), prev_result=prev_result,
        valid_attachments=valid, runtime_config=runtime_config, dns=dns, config=config,
    )


def _parse_prev_result(prev: Any, cni_version: str) -> dict[str, Any] | None:
    if prev is None:
        return None
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "invalid network config: prevResult must be an object")
    return convert({"cniVersion": cni_version, **prev}, LATEST_VERSION)


# --- results --------------------------------------------------------------------------

RouteSpec = tuple[str, str | None]  # (dst CIDR, gateway or None)


def _cidr(address: str) -> str:
    """``ip/prefix`` normalised; ValueError without a prefix or when invalid."""
    if "/" not in address:
        raise ValueError(f"address {address!r} needs a prefix length (ip/prefix)")
    iface = ipaddress.ip_interface(address)
    return f"{iface.ip}/{iface.network.prefixlen}"


def _ip(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _routes(routes: Iterable[RouteSpec]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dst, gw in routes:
        route: dict[str, Any] = {"dst": str(ipaddress.ip_network(dst, strict=False))}
        if gw:
            route["gw"] = _ip(gw)
        out.append(route)
    return out


def _dns(dns: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in DNS_KEYS:
        value = (dns or {}).get(key)
        if value:
            out[key] = value if isinstance(value, str) else list(value)
    return out


def _ipconfig(address: str, gateway: str | None, interface: int | None) -> dict[str, Any]:
    ip: dict[str, Any] = {"address": _cidr(address)}
    if gateway:
        ip["gateway"] = _ip(gateway)
    if interface is not None:
        ip["interface"] = interface
    return ip


def build_result(*, ifname: str, mac: str, sandbox: str, address: str,
                 gateway: str | None = None, routes: Iterable[RouteSpec] = (),
                 dns: Mapping[str, Any] | None = None, host_ifname: str | None = None,
                 host_mac: str | None = None,
                 extra_ips: Sequence[tuple[str, str | None]] = ()) -> dict[str, Any]:
    """A main plugin's ADD result, 1.1.0 shape.

    ``interfaces`` lists the host end first (when ``host_ifname`` is given, no
    sandbox) and the container interface last; every ip points at the container
    interface. ``address`` (and each of ``extra_ips``) is ``ip/prefix``; routes
    are (dst, gw) pairs; ``dns`` keys follow the spec and appear only when set.
    Raises ValueError on malformed addresses (a bug, not a user error).
    """
    interfaces: list[dict[str, Any]] = []
    if host_ifname:
        host: dict[str, Any] = {"name": host_ifname}
        if host_mac:
            host["mac"] = host_mac.lower()
        interfaces.append(host)
    container: dict[str, Any] = {"name": ifname}
    if mac:
        container["mac"] = mac.lower()
    container["sandbox"] = sandbox
    interfaces.append(container)
    index = len(interfaces) - 1
    ips = [_ipconfig(address, gateway, index)]
    ips += [_ipconfig(a, gw, index) for a, gw in extra_ips]
    result: dict[str, Any] = {"cniVersion": LATEST_VERSION, "interfaces": interfaces, "ips": ips}
    return _with_routes_and_dns(result, routes, dns)


def _with_routes_and_dns(result: dict[str, Any], routes: Iterable[RouteSpec],
                         dns: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add ``routes`` and ``dns`` to a result, only when there are any (as the spec shows)."""
    route_list = _routes(routes)
    if route_list:
        result["routes"] = route_list
    dns_doc = _dns(dns)
    if dns_doc:
        result["dns"] = dns_doc
    return result


def build_ipam_result(*, address: str, gateway: str | None = None,
                      routes: Iterable[RouteSpec] = (), dns: Mapping[str, Any] | None = None,
                      extra_ips: Sequence[tuple[str, str | None]] = ()) -> dict[str, Any]:
    """An IPAM plugin's ADD result, 1.1.0 shape: ips (no interface index), routes, dns."""
    ips = [_ipconfig(address, gateway, None)]
    ips += [_ipconfig(a, gw, None) for a, gw in extra_ips]
    result: dict[str, Any] = {"cniVersion": LATEST_VERSION, "ips": ips}
    return _with_routes_and_dns(result, routes, dns)


def ip_version(address: str) -> str:
    """``"4"`` or ``"6"`` for an ``ip/prefix`` (IPv4-mapped IPv6 counts as 4, as in Go)."""
    try:
        ip = ipaddress.ip_interface(address).ip
    except ValueError:
        return "6" if ":" in address else "4"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return "6"
    return "4"


def _list_of_objects(result: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = result.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CniError(INVALID_CONFIG, f"invalid result: {key} must be a list of objects")
    return [dict(v) for v in value]


def convert(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """``result`` (any supported version; none given means 1.1.0) as ``to_version``.

    Follows libcni's converters: 1.x results have no ip ``version``; 0.3.x and
    0.4.0 results get ``"version": "4"|"6"`` and keep only name/mac/sandbox of
    interfaces. Empty lists and an empty dns are left out. Unknown top-level
    keys are dropped. CniError 1 for an unsupported version, 7 for a result
    that is not shaped like one.
    """
    if to_version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'cannot convert a result to "{to_version}"; plugin supports '
                       f"{_supported_text()}")
    if not isinstance(result, Mapping):
        raise CniError(INVALID_CONFIG, "invalid result: not an object")
    from_version = result.get("cniVersion") or LATEST_VERSION
    if from_version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'cannot convert a result from "{from_version}"; plugin supports '
                       f"{_supported_text()}")
    interfaces = _list_of_objects(result, "interfaces")
    ips = _list_of_objects(result, "ips")
    routes = _list_of_objects(result, "routes")
    dns = result.get("dns")
    if dns is not None and not isinstance(dns, dict):
        raise CniError(INVALID_CONFIG, "invalid result: dns must be an object")

    legacy = to_version in LEGACY_RESULT_VERSIONS
    out: dict[str, Any] = {"cniVersion": to_version}
    if legacy:
        interfaces = [{k: i[k] for k in ("name", "mac", "sandbox") if k in i and i[k] != ""}
                      for i in interfaces]
        new_ips = []
        for ip in ips:
            item: dict[str, Any] = {"version": ip_version(str(ip.get("address", "")))}
            for key in ("interface", "address", "gateway"):
                if ip.get(key) is not None:
                    item[key] = ip[key]
            new_ips.append(item)
        ips = new_ips
    else:
        for ip in ips:
            ip.pop("version", None)
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    dns_doc = {k: v for k, v in (dns or {}).items() if v not in (None, "", [])}
    if dns_doc:
        out["dns"] = dns_doc
    return out


def compare_prev_result(prev: Mapping[str, Any] | None,
                        recorded: Mapping[str, Any]) -> list[str]:
    """CHECK: what of the recorded result is missing or different in prevResult.

    Every interface and address netd recorded must be in prevResult with the
    same MAC, sandbox and gateway; extra entries (a chained plugin's) are fine.
    Routes are not compared here: later plugins may change them, and the agent
    checks the routes in the container itself. Returns one sentence per problem.
    """
    if prev is None:
        return ["prevResult is missing"]
    try:
        prev_doc = convert(prev, LATEST_VERSION)
        rec_doc = convert(recorded, LATEST_VERSION)
    except CniError as exc:
        return [f"prevResult cannot be read: {exc}"]
    problems: list[str] = []
    prev_ifaces = prev_doc.get("interfaces", [])
    rec_ifaces = rec_doc.get("interfaces", [])
    for iface in rec_ifaces:
        name = iface.get("name")
        sandbox = iface.get("sandbox", "")
        match = [p for p in prev_ifaces
                 if p.get("name") == name and p.get("sandbox", "") == sandbox]
        where = f" in {sandbox}" if sandbox else ""
        if not match:
            problems.append(f"interface {name}{where} is not in prevResult")
            continue
        want, got = str(iface.get("mac", "")).lower(), str(match[0].get("mac", "")).lower()
        if want and got != want:
            problems.append(f"interface {name}{where} has MAC {got or 'none'} in prevResult, "
                            f"netd assigned {want}")
    prev_ips: dict[str, list[dict[str, Any]]] = {}
    for p in prev_doc.get("ips", []):
        prev_ips.setdefault(_norm_cidr(p.get("address")), []).append(p)
    for ip in rec_doc.get("ips", []):
        address = _norm_cidr(ip.get("address"))
        want_gw = _norm_ip(ip.get("gateway"))
        candidates = prev_ips.get(address, [])
        if not candidates:
            problems.append(f"address {address} is not in prevResult")
            continue
        found = next((c for c in candidates if _norm_ip(c.get("gateway")) == want_gw),
                     candidates[0])
        got_gw = _norm_ip(found.get("gateway"))
        if want_gw and got_gw != want_gw:
            problems.append(f"address {address} has gateway {got_gw or 'none'} in prevResult, "
                            f"netd assigned {want_gw}")
        want_if = _iface_name(rec_ifaces, ip.get("interface"))
        got_if = _iface_name(prev_ifaces, found.get("interface"))
        if want_if and got_if and want_if != got_if:
            problems.append(f"address {address} is on {got_if} in prevResult, "
                            f"netd put it on {want_if}")
    return problems


def _norm_cidr(value: Any) -> str:
    try:
        return _cidr(str(value))
    except ValueError:
        return str(value)


def _norm_ip(value: Any) -> str:
    if value is None or value == "":
        return ""
    try:
        return _ip(str(value))
    except ValueError:
        return str(value)


def _iface_name(interfaces: Sequence[Mapping[str, Any]], index: Any) -> str:
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(interfaces):
        return str(interfaces[index].get("name", ""))
    return ""


# --- what the plugin prints ----------------------------------------------------------


def _json_line(doc: Mapping[str, Any]) -> str:
    """Compact ASCII JSON and a newline: byte for byte what the plugin shim prints."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n"


def request_version(config: Any) -> str:
    """The ``cniVersion`` a plugin answers in: the config's, else the latest (as the shim)."""
    version = config.get("cniVersion") if isinstance(config, Mapping) else None
    return version if isinstance(version, str) and version else LATEST_VERSION


def render_reply(answer: Mapping[str, Any], cni_version: str) -> tuple[int, str]:
    """An agent answer -> (exit status, stdout) exactly as the plugin shim renders it.

    For plugins that ask the agent to render (``"reply": "cni"``, the native
    fast path of ``netd-cni``); ``netd.cni.shim.render_answer`` is the same
    rule for the JSON answer line (a unit test holds the two together).
    """
    err = answer.get("error")
    if isinstance(err, Mapping):
        code = err.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = INTERNAL
        msg = err.get("msg")
        details = err.get("details")
        return 1, _json_line({"cniVersion": cni_version, "code": code,
                              "msg": msg if isinstance(msg, str) and msg else "netd agent error",
                              "details": details if isinstance(details, str) else ""})
    result = answer.get("result")
    if isinstance(result, Mapping):
        if not result:
            return 0, ""
        if "cniVersion" not in result:
            result = {"cniVersion": cni_version, **result}
        return 0, _json_line(result)
    return 1, _json_line({"cniVersion": cni_version, "code": IO_FAILURE,
                          "msg": "invalid answer from the netd agent",
                          "details": "expected an object with 'result' or 'error'"})
