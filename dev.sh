#!/usr/bin/env bash
# One entry point for a fresh Debian machine (root): installs what wgjit needs, idempotently,
# then runs the demo or the test suite.
#   ./dev.sh demo     live network-namespace demo (SQLite store, wireguard-go)
#   ./dev.sh test     the full test suite (unit, end-to-end in namespaces)
#   ./dev.sh setup    only install
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(wireguard-go wireguard-tools iptables iproute2 iputils-ping
    qemu-system-x86 linux-image-amd64 kmod busybox-static  # kernel WireGuard tests under qemu
    systemd  # systemd-analyze verify checks contrib/systemd (not started: just the binaries)
    chromium)  # the web page's tests drive Debian's headless Chromium (Playwright, no download)
VENV=.venv
# PostgreSQL server binaries: the store tests initdb a throwaway cluster. The machine image has
# Debian's postgresql-15; install the server only where it is missing.
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    APT_PACKAGES+=(postgresql)
fi

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: must run as root (network namespaces, WireGuard devices); try: sudo $0 $*" >&2
        exit 1
    fi
}

setup_apt() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq
        # --no-install-recommends: wireguard-tools would otherwise pull a whole kernel package
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

setup_venv() {
    local stamp="$VENV/.wgjit-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # reinstall only when the project metadata changed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "dev.sh: installing wgjit and its Python dependencies into $VENV" >&2
        if ! { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e '.[test]'; } \
                >"$VENV/pip.log" 2>&1; then
            tail -n 30 "$VENV/pip.log" >&2
            echo "dev.sh: pip install failed; full log in $VENV/pip.log" >&2
            exit 1
        fi
        touch "$stamp"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup)
        need_root; setup_apt; setup_venv ;;
    demo)
        need_root; setup_apt; setup_venv
        exec "$VENV/bin/wgjit" demo "$@" ;;
    test)
        need_root; setup_apt; setup_venv
        "$VENV/bin/ruff" check wgjit tests benchmarks
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *)
        echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
