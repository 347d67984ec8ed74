#!/usr/bin/env bash
# `make demo`: start the server on the embedded default model, stream one real request with an
# image through the Python client, then stop the server (SIGTERM, graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${PORT:-50051}
METRICS_PORT=${METRICS_PORT:-9090}
IMAGE=${IMAGE:-tests/fixtures/golden/images/A_640x480.png}

$PY -m service --port "$PORT" --metrics-port "$METRICS_PORT" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

echo "waiting for the server on 127.0.0.1:$PORT to load its model..."
for _ in $(seq 1 600); do
  if $PY -m client info --server "127.0.0.1:$PORT" 2>/dev/null | grep -q '"alive": true'; then break; fi
  kill -0 $server 2>/dev/null || { echo "server exited" >&2; exit 1; }
  sleep 0.5
done

echo
echo "\$ python -m client chat --server 127.0.0.1:$PORT --image $IMAGE --max-new-tokens 32 \"Describe this image.\""
$PY -m client chat --server "127.0.0.1:$PORT" --image "$IMAGE" --max-new-tokens 32 "Describe this image."
echo
echo "(the embedded default model has random weights: the text is meaningless, the serving path is real)"
