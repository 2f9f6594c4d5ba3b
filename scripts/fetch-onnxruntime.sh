#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library from the onnxruntime-node npm
# package (without running its install script) and verifies both the tarball
# and the library against pinned SHA-256 sums.
set -euo pipefail
version=$1 tarball_sha=$2 lib_sha=$3 dest=$4

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching onnxruntime-node@$version (ONNX Runtime library) ..." >&2
(cd "$tmp" && npm pack --silent "onnxruntime-node@$version" >/dev/null)
tgz="$tmp/onnxruntime-node-$version.tgz"
echo "$tarball_sha  $tgz" | sha256sum --check --quiet - || { echo "tarball checksum mismatch" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/bin/napi-v6/linux/x64/libonnxruntime.so.1
lib="$tmp/package/bin/napi-v6/linux/x64/libonnxruntime.so.1"
echo "$lib_sha  $lib" | sha256sum --check --quiet - || { echo "library checksum mismatch" >&2; exit 1; }
mkdir -p "$dest"
install -m 0644 "$lib" "$dest/libonnxruntime.so.1.partial"
mv "$dest/libonnxruntime.so.1.partial" "$dest/libonnxruntime.so.1"
echo "ONNX Runtime $version: $dest/libonnxruntime.so.1" >&2
