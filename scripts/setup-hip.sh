#!/usr/bin/env bash
# Sets up the AMD (HIP) compile check without a GPU: Debian's clang-19 compiles the CUDA-dialect
# kernels for gfx942 (MI300) and gfx90a (MI200). Idempotent; quick when already done.
#
# Debian's ROCm device libraries (5.2) stop at gfx940, so this builds the missing
# oclc_isa_version_942.bc into .toolchain/rocm-bitcode next to links to the system .bc files;
# pass that folder as --rocm-device-lib-path (scripts/check-kernels.sh does).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
packages=(clang-19 lld-19 llvm-19 libamdhip64-dev rocm-device-libs)
system_bitcode=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode
bitcode_dir="$repo_root/.toolchain/rocm-bitcode"

missing=()
for pkg in "${packages[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == *'install ok installed'* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  echo "setup-hip: installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
else
  echo "setup-hip: ${packages[*]} already installed"
fi

[[ -f "$system_bitcode/oclc_isa_version_940.bc" ]] || {
  echo "setup-hip: $system_bitcode/oclc_isa_version_940.bc missing (rocm-device-libs)" >&2
  exit 1
}
mkdir -p "$bitcode_dir"
for bc in "$system_bitcode"/*.bc; do
  ln -sfn "$bc" "$bitcode_dir/$(basename "$bc")"
done
isa_942="$bitcode_dir/oclc_isa_version_942.bc"
if [[ ! -f "$isa_942" || -L "$isa_942" ]]; then
  # The 940 library holds one constant, the ISA version (9400); gfx942 is 9402.
  rm -f "$isa_942"
  llvm-dis-19 "$system_bitcode/oclc_isa_version_940.bc" -o - |
    sed 's/i32 9400/i32 9402/' | llvm-as-19 -o "$isa_942"
  # Not `llvm-dis | grep -q`: grep's early exit would fail the pipe under pipefail.
  [[ "$(llvm-dis-19 "$isa_942" -o -)" == *'i32 9402'* ]] || {
    echo "setup-hip: rewriting the ISA version to 9402 failed" >&2
    exit 1
  }
  echo "setup-hip: built $isa_942"
fi
echo "setup-hip: done; device libraries in $bitcode_dir ($(clang++-19 --version | head -n 1))"
