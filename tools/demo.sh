#!/usr/bin/env bash
# `make demo`: start the server on the embedded default model, stream one real request with an
# image through the command-line client, then stop the server (SIGTERM, graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-50051}
METRICS_PORT=${METRICS_PORT:-9450}
IMAGE=${IMAGE:-tests/fixtures/golden/images/A_640x480.png}
LOG=${LOG:-$(mktemp -t visionchat-demo.XXXXXX.log)}

# The server's log goes to a file, so it never lands in the middle of the streamed text.
$BIN/visionchat-server --port "$PORT" --metrics-port "$METRICS_PORT" "$@" >"$LOG" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

echo "waiting for the server on 127.0.0.1:$PORT to load its model (log: $LOG)..."
for _ in $(seq 1 600); do
  if $BIN/visionchat info --server "127.0.0.1:$PORT" 2>/dev/null | grep -q '"alive": true'; then break; fi
  kill -0 $server 2>/dev/null || { echo "server exited:" >&2; tail -20 "$LOG" >&2; exit 1; }
  sleep 0.5
done

echo
echo "\$ visionchat chat --server 127.0.0.1:$PORT --image $IMAGE --max-new-tokens 32 \"Describe this image.\""
$BIN/visionchat chat --server "127.0.0.1:$PORT" --image "$IMAGE" --max-new-tokens 32 "Describe this image."
echo
echo "(the embedded default model has random weights: the text is meaningless, the serving path is real)"
echo "server log: $LOG"
