#!/usr/bin/env bash
# The demo: a throwaway cluster with the worker preloaded, a local receiver,
# two endpoints (a postback and a signed webhook), a few conversions (one
# endpoint fails once, then succeeds), and the deliveries and attempts that
# result. Re-running replaces the previous demo.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-/tmp/pg_postback_demo}
DEMO_PORT=${DEMO_PORT:-54329}
RECEIVER_PORT=${RECEIVER_PORT:-18099}
RECEIVER_PID=/tmp/pg_postback_demo_receiver.pid
RECEIVER_LOG=/tmp/pg_postback_demo_receiver.log
PSQL=(/usr/lib/postgresql/15/bin/psql -X -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)

scripts/demo-stop.sh "$DEMO_DIR" >/dev/null 2>&1 || true

echo "==> starting a throwaway cluster in $DEMO_DIR on port $DEMO_PORT"
python3 tests/e2e/cluster.py start "$DEMO_DIR" "$DEMO_PORT"
echo "==> starting a local receiver on 127.0.0.1:$RECEIVER_PORT (log: $RECEIVER_LOG)"
nohup python3 tests/e2e/receiver.py "$RECEIVER_PORT" >"$RECEIVER_LOG" 2>&1 &
echo $! >"$RECEIVER_PID"
for _ in $(seq 1 50); do
    (echo >/dev/tcp/127.0.0.1/"$RECEIVER_PORT") 2>/dev/null && break
    sleep 0.1
done

"${PSQL[@]}" -q <<SQL
CREATE EXTENSION pg_postback;
INSERT INTO postback.endpoints (name, kind, url_template, status_map, drop_empty_params, retry_schedule)
VALUES ('network-a', 'postback',
        'http://127.0.0.1:$RECEIVER_PORT/pb?cid={click_id}&txid={transaction_id}&status={status}&payout={amount}&sub1={attributes.sub1}',
        '{"approved": "1", "rejected": "2"}', true, '{1 second, 5 seconds}');
INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme, retry_schedule)
VALUES ('partner-webhook', 'webhook', 'http://127.0.0.1:$RECEIVER_PORT/flaky', 'standard-webhooks', '{1 second, 5 seconds}');
INSERT INTO postback.endpoint_secrets (endpoint_id, secret)
SELECT id, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' FROM postback.endpoints WHERE name = 'partner-webhook';

INSERT INTO postback.conversions (click_id, transaction_id, event, status, amount, currency, attributes) VALUES
    ('clk-1001', 'order-1', 'sale', 'approved', 49.90, 'EUR', '{"sub1": "spring promo"}'),
    ('clk-1002', 'order-2', 'lead', 'pending',  NULL,  NULL,  '{}'),
    ('clk-1003', 'order-3', 'sale', 'approved', 12.00, 'USD', '{"sub1": "a&b"}');
UPDATE postback.conversions SET status = 'approved' WHERE transaction_id = 'order-2';
SQL

echo "==> waiting for the worker (the webhook receiver answers 503 once, then 200)"
for _ in $(seq 1 60); do
    left=$("${PSQL[@]}" -Atc "SELECT count(*) FROM postback.deliveries WHERE state NOT IN ('succeeded', 'dead')")
    [ "$left" = 0 ] && break
    sleep 0.5
done

echo "==> the worker"
"${PSQL[@]}" -c "SELECT running, role, pid, database, sent, succeeded, failed FROM postback.worker_status()"
echo "==> tables"
"${PSQL[@]}" -c '\dt postback.*'
echo "==> deliveries"
"${PSQL[@]}" -c "SELECT d.id, e.name AS endpoint, d.status, d.state, d.attempts, left(d.url, 100) AS url
                   FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id ORDER BY d.id"
echo "==> attempts"
"${PSQL[@]}" -c "SELECT a.delivery_id, a.attempt_no, a.status_code, round(a.duration_ms::numeric, 1) AS ms,
                        a.outcome, a.response_body, a.error
                   FROM postback.attempts a ORDER BY a.delivery_id, a.attempt_no"
echo "==> what the receiver saw"
cat "$RECEIVER_LOG"

cat <<MSG
==> the demo is running
    connect:  psql -h 127.0.0.1 -p $DEMO_PORT -U postgres postgres
    stop it:  make demo-stop
MSG
