# pg_postback: the README's two commands are `make demo` and `make test`.
PG_CONFIG   ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_PGDATA ?= /tmp/pg_postback_pgrx_tests
DEMO_DIR    ?= /tmp/pg_postback_demo
DEMO_PORT   ?= 54329
PYTEST_ARGS ?=

.PHONY: deps lint unit pgtest install install-release install-upgrades e2e test demo demo-stop bench bench-quick bench-tools faults faults-quick citus-test package package-test

deps:
	scripts/install-deps.sh

# Formatting (rustfmt.toml) and every clippy warning are errors.
lint: deps
	cargo fmt --check
	cargo clippy --all-targets --features pg15 -- -D warnings

# Pure Rust modules (no Postgres needed); the #[pg_test]s run under `pgtest`.
unit: deps
	cargo test --lib -- --skip sql_tests::

# SQL-level tests inside a pgrx-managed throwaway cluster, as the postgres OS user.
# Built in a target directory of its own: the pg_test build's schema generator
# (which adds the test functions) must never write the install script of `make install`.
pgtest: deps
	rm -rf $(PGRX_PGDATA)
	CARGO_TARGET_DIR=$(CURDIR)/target/pgtest cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_PGDATA)

install: deps
	cargo pgrx install --pg-config $(PG_CONFIG)
	$(MAKE) install-upgrades

install-release: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG)
	$(MAKE) install-upgrades

# Upgrade steps and the frozen install scripts of released versions, beside
# the generated install script of this version.
install-upgrades:
	for f in sql/upgrade/pg_postback--*--*.sql sql/releases/pg_postback--*.sql; do \
	  [ -e "$$f" ] && install -m 644 "$$f" "$$($(PG_CONFIG) --sharedir)/extension/" || true; \
	done

# End-to-end: real preloaded clusters on free ports, real loopback receivers.
e2e: install
	cd tests/e2e && python3 -m pytest -q $(PYTEST_ARGS)

# A Debian package (target/debian/postgresql-15-pg-postback_<version>_amd64.deb), and its
# test: dpkg -i, a cluster without cargo on the PATH, dpkg -r (changes the system, so not
# part of `make test`).
package:
	scripts/package.sh

package-test: package
	scripts/package-test.sh

# pg_postback on a three-node Citus cluster on this machine (not part of `make test`):
# builds and installs Citus from ../shared/citus when it is missing.
citus-test: install
	cd tests/citus && python3 -m pytest -q $(PYTEST_ARGS)

# Fault scenarios (crashes, broken receivers) and every bad-input case; the
# quick subset runs in `make test`, the whole suite (under 20 minutes) here.
faults: install
	python3 tests/faults/run.py

faults-quick: install
	python3 tests/faults/run.py --quick

test: lint unit pgtest e2e faults-quick

demo: install-release
	DEMO_DIR=$(DEMO_DIR) DEMO_PORT=$(DEMO_PORT) scripts/demo.sh

demo-stop:
	scripts/demo-stop.sh $(DEMO_DIR)

# Benchmarks (release build): every figure side by side in one run, printed
# beside its goal and written to target/bench/summary.json.
bench-tools: install-release
	cargo build --release --example bench_receiver --example bench_client

bench: bench-tools
	python3 bench/run.py
	python3 bench/metrics.py

bench-quick: bench-tools
	python3 bench/run.py --quick
