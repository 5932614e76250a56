# Shared by the provisioning scripts. NETD_ROOT: where files go (default /); with
# NETD_DRY_RUN=1 nothing is installed, started or configured on the machine itself
# (the tests run the scripts that way and check what they write).
set -euo pipefail
ROOT="${NETD_ROOT:-}"
DRY="${NETD_DRY_RUN:-0}"
NETD="${NETD_BIN:-/opt/netd/bin/netd}"
SRC="${NETD_SRC:-/vagrant}"

# run a command that changes the machine (skipped in a dry run, shown either way)
sys() {
    echo "+ $*"
    if [ "$DRY" != 1 ]; then "$@"; fi
}

# write stdin to ROOT/PATH (mode $2, default 0644)
put() {
    local path="$ROOT$1" mode="${2:-0644}"
    mkdir -p "$(dirname "$path")"
    cat > "$path.tmp"
    chmod "$mode" "$path.tmp"
    mv "$path.tmp" "$path"
    echo "wrote $path"
}

apt_install() {
    sys env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
