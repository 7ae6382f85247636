#!/usr/bin/env bash
# Builds target/debian/postgresql-15-pg-postback_<version>_amd64.deb, laid out like
# Debian's PostgreSQL extension packages: the library in the server's lib directory;
# control, install, upgrade and frozen release scripts in its extension directory; the
# README, licence, changelog and contrib/ (Prometheus, Grafana) under /usr/share/doc.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name=postgresql-15-pg-postback
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension
stage=target/debian/stage
root=target/debian/${name}_${version}_amd64

scripts/install-deps.sh
rm -rf "$stage" "$root"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$stage"
mkdir -p "$root/DEBIAN" "$root$libdir" "$root$extdir"
install -m 644 "$stage$libdir/pg_postback.so" "$root$libdir/"
install -m 644 "$stage$extdir"/pg_postback* "$root$extdir/"
install -m 644 sql/upgrade/pg_postback--*--*.sql sql/releases/pg_postback--*.sql "$root$extdir/"
doc=$root/usr/share/doc/$name
mkdir -p "$doc/contrib"
install -m 644 README.md "$doc/"
{ echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: pg_postback"
  echo
  echo "Files: *"
  echo "License: MIT"
  sed 's/^$/./; s/^/ /' LICENSE; } > "$doc/copyright"
gzip -9n < debian/changelog > "$doc/changelog.Debian.gz"
cp -r contrib/prometheus contrib/grafana "$doc/contrib/"
find "$root" -type d -exec chmod 755 {} +
find "$doc" -type f -exec chmod 644 {} +
strip --strip-unneeded "$root$libdir/pg_postback.so"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed "s/@VERSION@/$version/; s/@SIZE@/$size/" debian/control.in > "$root/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$root" "target/debian/${name}_${version}_amd64.deb" >/dev/null
echo "target/debian/${name}_${version}_amd64.deb"
