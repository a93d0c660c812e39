#!/usr/bin/env bash
# Lists the AMD code objects the `hip` build embedded (build.rs writes them to
# target/hip/release/build/mhc-train-*/out/hip/<stem>.<arch>.co): each object's architecture
# (ELF flags) and kernel symbols (llvm-readelf-19), and fails if any object is not for the arch
# its name says. Then runs tests/hip.rs with the hip feature, which fails if any kernel of the
# table in src/gpu/mod.rs (every kernel the CUDA build launches, each dtype and n) is missing from
# the gfx942 or gfx90a object, or has another argument layout than the HIP layer packs.
#
#   scripts/check-hip-objects.sh      (after a --features hip build in target/hip)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export CARGO_TARGET_DIR="$repo_root/target/hip" HIP_PATH="${HIP_PATH:-/usr}"

# The newest build output (cargo keeps one folder per build-script hash).
stamp="$(ls -t target/hip/release/build/mhc-train-*/out/hip_kernels.rs 2>/dev/null | head -n 1 || true)"
if [[ -z "$stamp" ]]; then
  echo "check-hip-objects: no hip build found; run scripts/build-hip.sh first" >&2
  exit 1
fi
object_dir="$(dirname "$stamp")/hip"
failures=()
for object in "$object_dir"/*.co; do
  name="$(basename "$object" .co)"
  arch="${name##*.}"
  flags="$(llvm-readelf-19 -h "$object" | grep -E '^\s*Flags:')"
  mapfile -t kernels < <(llvm-readelf-19 -sW "$object" | awk '$NF ~ /\.kd$/ { sub(/\.kd$/, "", $NF); print $NF }' | sort -u)
  echo "== $name: ${flags#*Flags:}"
  echo "   ${#kernels[@]} kernels: ${kernels[*]}"
  grep -qw "$arch" <<<"$flags" || failures+=("$name is not a $arch code object")
done
if ((${#failures[@]})); then
  printf 'check-hip-objects: FAIL: %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "check-hip-objects: table vs embedded objects (tests/hip.rs)"
cargo test --release --features hip --test hip
