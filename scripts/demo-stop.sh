#!/usr/bin/env bash
# Stops and removes the demo cluster and its receiver.
set -u
cd "$(dirname "$0")/.."
DEMO_DIR=${1:-/tmp/pg_postback_demo}
RECEIVER_PID=/tmp/pg_postback_demo_receiver.pid
if [ -f "$RECEIVER_PID" ]; then
    kill "$(cat "$RECEIVER_PID")" 2>/dev/null || true
    rm -f "$RECEIVER_PID"
fi
python3 tests/e2e/cluster.py stop "$DEMO_DIR"
echo "demo stopped"
