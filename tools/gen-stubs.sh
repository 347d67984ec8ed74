#!/usr/bin/env bash
# Generates the Go, Java, C++ and TypeScript stubs of the VisionChat contract from proto/ only, into
# gen/go, gen/java, gen/cpp and gen/ts, then type-checks the TypeScript stubs with tsc.
# Run through `make stubs`, which installs the tools first (`make setup`): protoc and the gRPC
# plugins from Debian (tools/install-system-deps.sh), buf, ts-proto and typescript from npm
# (client/node/package-lock.json). The plugins and their options are in buf.gen.yaml.
# Idempotent: every run deletes those four folders and writes them anew (buf.gen.yaml `clean`);
# gen/python is the Makefile's and is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NODE_BIN="client/node/node_modules/.bin"

missing=()
for tool in protoc protoc-gen-go protoc-gen-go-grpc grpc_java_plugin grpc_cpp_plugin node; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
for tool in buf protoc-gen-ts_proto tsc; do
  [ -x "$NODE_BIN/$tool" ] || missing+=("$NODE_BIN/$tool")
done
if ((${#missing[@]})); then
  echo "gen-stubs: missing ${missing[*]}; run \`make setup\` (or \`make stubs\`) first" >&2
  exit 1
fi

"$NODE_BIN/buf" generate --template buf.gen.yaml

# A module of its own for the Go package (import path from the proto's go_package), so that a Go
# program can use it with `replace github.com/visionchat/visionchat/gen/go => PATH/gen/go`; the
# consumer's `go mod tidy` picks the grpc and protobuf versions.
printf 'module github.com/visionchat/visionchat/gen/go\n\ngo 1.19\n' > gen/go/go.mod

# The TypeScript stubs against the pinned @grpc/grpc-js and @bufbuild/protobuf, with the Node client
# and client/node/stubs-example.ts (a program on the stubs): strict, no emit.
"$NODE_BIN/tsc" -p client/node/tsconfig.json

for dir in gen/go gen/java gen/cpp gen/ts; do
  echo "gen-stubs: $dir: $(find "$dir" -type f | wc -l) files"
done
