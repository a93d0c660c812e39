#!/usr/bin/env bash
# Builds the CUDA binary (and optionally the test executables) on a machine without a GPU and puts
# stripped copies in .bin/ (git-ignored) to carry to the GPU machine.
#
#   scripts/build-cuda.sh            release binary with --features cuda   -> .bin/mhc-train-cuda
#   scripts/build-cuda.sh --nccl     same with --features nccl (multi-GPU; needs libnccl.so.2 at run time)
#   scripts/build-cuda.sh --tests    also the test executables             -> .bin/test-<target>-cuda
#   scripts/build-cuda.sh --pack     also one archive of what was built    -> .bin/mhc-cuda-bins.tar.xz
#
# The device tool carries at most 64 MiB and the stripped binary alone is about 60 MiB, so carry
# the archive (about 15 MB for the binary and every test executable): scripts/gpu-run.sh unpacks it.
#
# The first build compiles candle-kernels with nvcc (about 16 minutes on 2 cores); target/cuda
# keeps the artifacts so later builds are incremental.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
features=cuda
with_tests=0
pack=0
for arg in "$@"; do
  case "$arg" in
    --nccl) features=nccl ;;
    --tests) with_tests=1 ;;
    --pack) pack=1 ;;
    -h | --help)
      sed -n '2,15p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "build-cuda: unknown argument '$arg' (expected --nccl, --tests, --pack)" >&2
      exit 2
      ;;
  esac
done

cd "$repo_root"
"$repo_root/scripts/setup-cuda.sh"
# shellcheck source=scripts/cuda-env.sh
. "$repo_root/scripts/cuda-env.sh"
mkdir -p .bin

start=$SECONDS
echo "build-cuda: cargo build --release --features $features (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --features "$features"
strip -o .bin/mhc-train-cuda "$CARGO_TARGET_DIR/release/mhc-train"
built=(mhc-train-cuda)
echo "build-cuda: .bin/mhc-train-cuda ($(du -h .bin/mhc-train-cuda | cut -f1), features: $features)"

if ((with_tests)); then
  echo "build-cuda: cargo test --release --features $features --no-run"
  # Copied to names that stay the same between builds (cargo's carry a hash).
  test_list="$(mktemp)"
  trap 'rm -f "$test_list"' EXIT
  cargo test --release --features "$features" --no-run --message-format=json-render-diagnostics |
    scripts/test-executables.py >"$test_list"
  while read -r name exe; do
    strip -o ".bin/test-$name-cuda" "$exe"
    built+=("test-$name-cuda")
    echo "build-cuda: .bin/test-$name-cuda ($(du -h ".bin/test-$name-cuda" | cut -f1))"
  done <"$test_list"
fi

if ((pack)); then
  # The binaries share most of their bytes (candle's kernels, our fatbin): a dictionary larger
  # than the whole tar lets xz store that once; preset 1 keeps it to seconds. xz because every
  # Python (lzma) can unpack it where no xz tool is installed.
  tar -C .bin -cf - "${built[@]}" | xz -T1 --lzma2=preset=1,dict=256MiB >.bin/mhc-cuda-bins.tar.xz.tmp
  mv .bin/mhc-cuda-bins.tar.xz.tmp .bin/mhc-cuda-bins.tar.xz
  echo "build-cuda: .bin/mhc-cuda-bins.tar.xz ($(du -h .bin/mhc-cuda-bins.tar.xz | cut -f1)): ${built[*]}"
fi
echo "build-cuda: finished in $((SECONDS - start)) s"
