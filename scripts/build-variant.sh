#!/usr/bin/env bash
# Builds one variant of the kernels for a side-by-side run on the GPU machine
# (`scripts/device-check.sh variants`): the CUDA binary (its selftest) and the sublayer test
# executable (its one-step timeline), stripped and compressed into .bin/variants/NAME/ (about
# 17 MB; the device tool carries 64 MiB, so three or four variants per call).
#
#   scripts/build-variant.sh NAME          the working tree as it is
#   scripts/build-variant.sh NAME REF      git REF, checked out here for the build (the tree must
#                                          be clean; the branch or commit checked out before is
#                                          restored, also on failure)
#
# Incremental after scripts/build-cuda.sh (same target folder): a kernel change takes about a
# minute on 2 cores.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if (($# < 1 || $# > 2)) || [[ "$1" == -h || "$1" == --help ]]; then
  sed -n '2,13p' "${BASH_SOURCE[0]}"
  exit 2
fi
name="$1"
ref="${2:-}"
if [[ ! "$name" =~ ^[A-Za-z0-9_.-]+$ ]]; then
  echo "build-variant: NAME '$name' must be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi

cd "$repo_root"
# The executable lister as of now (REF may predate it); the checkout restored on exit.
lister="$(mktemp)"
back=""
trap 'rm -f "$lister"; [[ -z "$back" ]] || git checkout --quiet "$back"' EXIT
cp scripts/test-executables.py "$lister"
if [[ -n "$ref" ]]; then
  if ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
    echo "build-variant: '$ref' is not a commit" >&2
    exit 2
  fi
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "build-variant: the working tree has changes; commit or stash them before building $ref" >&2
    exit 1
  fi
  back="$(git symbolic-ref --quiet --short HEAD || git rev-parse HEAD)"
  git checkout --quiet "$ref"
fi

"$repo_root/scripts/setup-cuda.sh"
# shellcheck source=scripts/cuda-env.sh
. "$repo_root/scripts/cuda-env.sh"
cargo build --release --features nccl
sublayer="$(cargo test --release --features nccl --no-run --test gpu_sublayer \
  --message-format=json-render-diagnostics | python3 "$lister" | awk '$1 == "gpu_sublayer" { print $2 }')"
out=".bin/variants/$name"
rm -rf "$out"
mkdir -p "$out"
strip -o "$out/mhc-train-cuda" "$CARGO_TARGET_DIR/release/mhc-train"
strip -o "$out/test-gpu_sublayer-cuda" "$sublayer"
xz -T0 "$out/mhc-train-cuda" "$out/test-gpu_sublayer-cuda"
git describe --always --dirty >"$out/commit"
echo "build-variant: $out ($(du -sh "$out" | cut -f1), commit $(cat "$out/commit")${ref:+, from $ref})"
