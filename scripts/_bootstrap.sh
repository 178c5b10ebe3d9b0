# Sourced by scripts/check and scripts/quickstart: makes .venv with drainbus installed.
# Usage: bootstrap [EXTRAS]   e.g. bootstrap test
set -euo pipefail

bootstrap() {
    local extras="${1:-}"
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "drainbus needs Python >= 3.11 ($python is $("$python" --version 2>&1))" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv" >&2
        "$python" -m venv .venv
    fi
    # Reinstall only when pyproject.toml changed: a re-run starts in a second.
    local stamp=".venv/.drainbus-installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "==> installing drainbus${extras:+[$extras]} into .venv" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}

# Debian packages the tests drive for real: the OpenSSH client, nginx, Varnish with the xkey
# vmod (varnish-modules) for the shipped examples/varnish VCL, and systemd's offline tools
# (systemd-analyze, -sysusers, -tmpfiles) that check the units in systemd/, and Prometheus's
# promtool for examples/prometheus and examples/grafana. Then, best effort,
# the other SSH clients of the client matrix (tests/test_clients.py): PuTTY's plink and
# puttygen, Dropbear's dbclient and dropbearconvert; the matrix skips, saying why, any of them
# that could not be installed.
need_debian_packages() {
    local missing=() clients=()
    command -v ssh >/dev/null || missing+=(openssh-client)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
    command -v varnishd >/dev/null || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
    compgen -G "/usr/lib/*/varnish/vmods/libvmod_xkey.so" >/dev/null \
        || compgen -G "/usr/lib/varnish/vmods/libvmod_xkey.so" >/dev/null \
        || missing+=(varnish-modules)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    # promtool checks the example Prometheus rules and the Grafana dashboard's queries.
    command -v promtool >/dev/null || missing+=(prometheus)
    { command -v plink && command -v puttygen; } >/dev/null || clients+=(putty-tools)
    { command -v dbclient && command -v dropbearconvert; } >/dev/null || clients+=(dropbear-bin)
    [ ${#missing[@]} -eq 0 ] && [ ${#clients[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq || echo "apt-get update failed; installing from the lists there are" >&2
        if [ ${#missing[@]} -gt 0 ]; then
            echo "==> apt-get install ${missing[*]}" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        fi
        if [ ${#clients[@]} -gt 0 ]; then
            echo "==> apt-get install ${clients[*]}" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${clients[@]}" >/dev/null \
                || echo "could not install ${clients[*]}: the client matrix skips those clients" >&2
        fi
        # The packages start a system nginx on port 80, varnish on 6081 and prometheus on
        # 9090; the tests run their own (and need only promtool).
        local service
        for service in nginx varnish prometheus; do
            if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
                systemctl stop "$service" || true
            fi
        done
    elif [ ${#missing[@]} -gt 0 ]; then
        echo "missing: ${missing[*]} — install with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    else
        echo "SSH clients not installed: ${clients[*]} (sudo apt-get install ${clients[*]});" \
            "the client matrix skips them" >&2
    fi
}
