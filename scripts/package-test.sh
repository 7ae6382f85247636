#!/usr/bin/env bash
# make package-test (changes the system, so not part of make test): installs the .deb
# with dpkg -i, then, with no cargo on the PATH, runs tests/package/check_package.py (a
# preloaded cluster, CREATE EXTENSION, a delivery to a loopback receiver, the update from
# 0.2.0's scripts); removes the package again and puts back what `make install` had put
# in its place, leaving the system as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=target/debian/postgresql-15-pg-postback_${version}_amd64.deb
[[ -f $deb ]] || { echo "no $deb: run make package first" >&2; exit 1; }
if dpkg -s postgresql-15-pg-postback >/dev/null 2>&1; then
    echo "postgresql-15-pg-postback is installed already; remove it first (dpkg -r)" >&2
    exit 1
fi
backup=$(mktemp -d)
shopt -s nullglob
before=("$libdir"/pg_postback.so "$extdir"/pg_postback*)
if ((${#before[@]})); then
    tar -cPf "$backup/installed.tar" "${before[@]}"
    rm -f "${before[@]}"
fi
restore() {
    dpkg -r postgresql-15-pg-postback >/dev/null 2>&1 || true
    if [[ -f $backup/installed.tar ]]; then tar -xPf "$backup/installed.tar"; fi
    rm -rf "$backup"
}
trap restore EXIT
echo "==> dpkg -i $deb"
dpkg -i "$deb"
dpkg -L postgresql-15-pg-postback | grep -qx "$libdir/pg_postback.so"
echo "==> tests/package/check_package.py, PATH without cargo"
# the interpreter the tests' packages were installed for, called by its path
py=$(python3 -c 'import sys; print(sys.executable)')
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$HOME" LANG=C.UTF-8 "$py" tests/package/check_package.py
echo "==> dpkg -r postgresql-15-pg-postback"
dpkg -r postgresql-15-pg-postback >/dev/null
[[ ! -e $libdir/pg_postback.so || -f $backup/installed.tar ]]
echo "package test passed"
