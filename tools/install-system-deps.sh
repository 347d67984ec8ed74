#!/usr/bin/env bash
# System packages the tests and `make stubs` need, installed from Debian's registry (idempotent).
# Needs root (CI and the dev containers run as root); prints what it does.
set -euo pipefail

PACKAGES=(
  prometheus                          # real Prometheus server + promtool for the metrics tests
  protobuf-compiler                   # protoc
  protobuf-compiler-grpc              # grpc_cpp_plugin (C++ stubs)
  protoc-gen-go                       # Go messages
  protoc-gen-go-grpc                  # Go services
  protobuf-compiler-grpc-java-plugin  # grpc-java stubs
  nodejs                              # Node client and TypeScript stubs
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v npm >/dev/null || { echo "npm not found (nodejs package without npm?)" >&2; exit 1; }
