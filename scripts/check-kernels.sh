#!/usr/bin/env bash
# Compile check of every kernels/*.cu for each GPU target, without a GPU:
#   AMD:    clang++-19 -x hip for gfx942 (MI300) and gfx90a (MI200)  (set up by scripts/setup-hip.sh)
#   NVIDIA: nvcc 13.0 for sm_90 (cubin) and compute_90 (PTX)        (when scripts/setup-cuda.sh ran)
# and proof that each object holds every `extern "C" __global__` kernel its source defines.
# Prints the kernel listing per file and target; exits non-zero naming each failing file, kernel
# and target. Proves the code builds for a target, not that it runs there.
#
#   scripts/check-kernels.sh [KERNEL_DIR]     (default: kernels; its folder is on the include path)
# Set KERNEL_CHECK_OUT=DIR to keep the objects (default: a temporary folder, removed at exit).
# Set REQUIRE_CUDA=1 to fail instead of skipping the NVIDIA targets when the CUDA toolchain is absent.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kernel_dir="${1:-$repo_root/kernels}"
hip_targets=(gfx942 gfx90a)

"$repo_root/scripts/setup-hip.sh" >&2
bitcode_dir="$repo_root/.toolchain/rocm-bitcode"

cuda_targets=()
if [[ -x "$repo_root/.toolchain/cuda/site/nvidia/cu13/bin/nvcc" ]]; then
  # shellcheck source=scripts/cuda-env.sh
  . "$repo_root/scripts/cuda-env.sh"
  cuda_targets=(sm_90 compute_90)
elif [[ "${REQUIRE_CUDA:-0}" == 1 ]]; then
  echo "check-kernels: CUDA toolchain missing; run scripts/setup-cuda.sh" >&2
  exit 1
else
  echo "check-kernels: CUDA toolchain not set up (scripts/setup-cuda.sh): checking AMD targets only" >&2
fi

if [[ -n "${KERNEL_CHECK_OUT:-}" ]]; then
  out="$KERNEL_CHECK_OUT"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

shopt -s nullglob
sources=("$kernel_dir"/*.cu)
if ((${#sources[@]} == 0)); then
  echo "check-kernels: no .cu files in $kernel_dir" >&2
  exit 1
fi

# Kernel names a preprocessed source declares (scripts/kernel_names.py).
declared_kernels() {
  python3 "$repo_root/scripts/kernel_names.py" "$1"
}

# Kernel names an object holds: AMD code objects list each kernel with its descriptor NAME.kd;
# a cubin lists each kernel as a FUNC symbol; PTX has one `.entry NAME(` per kernel.
object_kernels() {
  local target="$1" object="$2"
  case "$target" in
    gfx*) llvm-readelf-19 -sW "$object" | awk '$NF ~ /\.kd$/ { sub(/\.kd$/, "", $NF); print $NF }' ;;
    sm_*) llvm-readelf-19 -sW "$object" | awk '$4 == "FUNC" && $5 == "GLOBAL" { print $NF }' ;;
    compute_*) grep -oP '\.entry\s+\K[A-Za-z_][A-Za-z0-9_]*' "$object" ;;
  esac | sort -u
}

# The compiler command for a target, without the output kind: sets the array `cmd`.
compiler_for() {
  case "$1" in
    gfx*) cmd=(clang++-19 -x hip --offload-arch="$1" --cuda-device-only --no-gpu-bundle-output
      -O3 -std=c++17 -mcode-object-version=5 --rocm-device-lib-path="$bitcode_dir") ;;
    sm_*) cmd=(nvcc -gencode "arch=compute_${1#sm_},code=$1" -O3 -std=c++17) ;;
    compute_*) cmd=(nvcc -arch="$1" -O3 -std=c++17) ;;
  esac
  cmd+=(-I "$kernel_dir")
}

# Called as an `if` condition, where `set -e` does not apply: each step returns its own failure.
compile() {
  local target="$1" src="$2" object="$3" cmd
  compiler_for "$target"
  case "$target" in
    gfx*)
      "${cmd[@]}" -c "$src" -o "$object" || return 1
      # The code object must be for the asked architecture ("Flags: 0x54C, gfx942, xnack, sramecc").
      grep -E '^\s*Flags:' <<<"$(llvm-readelf-19 -h "$object")" | grep -qw "$target" || {
        echo "check-kernels: $object is not a $target code object" >&2
        return 1
      }
      ;;
    sm_*) "${cmd[@]}" -cubin "$src" -o "$object" ;;
    compute_*) "${cmd[@]}" -ptx "$src" -o "$object" ;;
  esac
}

targets=("${hip_targets[@]}" "${cuda_targets[@]}")
failures=()
for src in "${sources[@]}"; do
  base="$(basename "$src" .cu)"
  # The kernels the source declares for any target: one hidden from a target by #if shows up
  # as missing from that target's object.
  declared=()
  for target in "${targets[@]}"; do
    compiler_for "$target"
    if "${cmd[@]}" -E "$src" -o "$out/$base.$target.i" 2>/dev/null; then
      mapfile -t -O "${#declared[@]}" declared < <(declared_kernels "$out/$base.$target.i")
    fi
  done
  mapfile -t declared < <(printf '%s\n' "${declared[@]}" | sed '/^$/d' | sort -u)
  echo "== $src: ${#declared[@]} kernel(s) declared: ${declared[*]:-(none)}"
  for target in "${targets[@]}"; do
    case "$target" in gfx*) ext=co ;; sm_*) ext=cubin ;; *) ext=ptx ;; esac
    object="$out/$base.$target.$ext"
    if ! compile "$target" "$src" "$object"; then
      failures+=("$src: compile failed for $target")
      echo "   $target: COMPILE FAILED"
      continue
    fi
    mapfile -t found < <(object_kernels "$target" "$object")
    echo "   $target: ${found[*]:-(no kernels)}"
    # A set lookup, not `printf | grep -q`: under pipefail grep's early exit can kill printf with
    # SIGPIPE and report a present kernel as missing (it did, in CI).
    declare -A in_object=()
    for name in "${found[@]}"; do in_object[$name]=1; done
    for name in "${declared[@]}"; do
      if [[ -z "${in_object[$name]:-}" ]]; then
        failures+=("$src: kernel $name missing from the $target object")
      fi
    done
    unset in_object
  done
done

if ((${#failures[@]})); then
  printf 'check-kernels: FAIL: %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "check-kernels: ok: ${#sources[@]} file(s), targets: ${targets[*]}"
