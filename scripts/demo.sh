#!/usr/bin/env bash
# Starts a throwaway cluster with the worker preloaded and shows pg_postback's schema.
# Re-running replaces the previous demo cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-/tmp/pg_postback_demo}
DEMO_PORT=${DEMO_PORT:-54329}
PSQL=(/usr/lib/postgresql/15/bin/psql -X -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)

echo "==> starting a throwaway cluster in $DEMO_DIR on port $DEMO_PORT"
python3 tests/e2e/cluster.py start "$DEMO_DIR" "$DEMO_PORT"
"${PSQL[@]}" -q -c "CREATE EXTENSION pg_postback"

echo "==> the worker"
"${PSQL[@]}" -c "SELECT running, pid, database FROM postback.worker_status()"
echo "==> tables"
"${PSQL[@]}" -c '\dt+ postback.*'
for table in endpoints conversions deliveries attempts; do
    "${PSQL[@]}" -c "\\d postback.$table"
done

cat <<MSG
==> the demo cluster is running
    connect:  psql -h 127.0.0.1 -p $DEMO_PORT -U postgres postgres
    stop it:  make demo-stop
MSG
