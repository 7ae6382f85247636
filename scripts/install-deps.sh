#!/usr/bin/env bash
# Installs what building, testing and the demo need, skipping what is present.
# Meant for a Debian machine, run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.0

missing=()
for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    echo "==> rustup component add clippy rustfmt"
    rustup component add clippy rustfmt
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "==> cargo install cargo-pgrx $PGRX_VERSION (takes a few minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -q "^pg15 *= *\"$PG_CONFIG\"" "$PGRX_HOME/config.toml" 2>/dev/null; then
    echo "==> cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

if ! python3 -c 'import psycopg, pytest, standardwebhooks, yaml' 2>/dev/null; then
    echo "==> pip install -r tests/requirements.txt (for $(command -v python3))"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
    pip=(python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt)
    # Debian's own python3 refuses global installs (PEP 668); this machine is ours to change.
    "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
fi
