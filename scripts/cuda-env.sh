# Source this (`. scripts/cuda-env.sh`) after scripts/setup-cuda.sh: environment for building the
# `cuda` feature with the project-local CUDA 13.0 toolchain on a machine without a GPU.
# shellcheck shell=bash

_mhc_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mhc_tc="$_mhc_repo_root/.toolchain/cuda"

if [[ ! -x "$_mhc_tc/site/nvidia/cu13/bin/nvcc" ]]; then
  echo "cuda-env: $_mhc_tc is not set up; run scripts/setup-cuda.sh first" >&2
  return 1
fi

export CUDA_ROOT="$_mhc_tc/site/nvidia/cu13"
export CUDA_PATH="$CUDA_ROOT"
case ":$PATH:" in
  *":$CUDA_ROOT/bin:"*) ;;
  *) export PATH="$CUDA_ROOT/bin:$PATH" ;;
esac
# No GPU here to detect: candle-kernels and our build.rs compile for H100/H200 (sm_90).
export CUDA_COMPUTE_CAP=90
# LIBRARY_PATH (not RUSTFLAGS, which would rebuild every crate) lets the linker find the
# unversioned .so links and the libcuda.so stub.
case ":${LIBRARY_PATH:-}:" in
  *":$_mhc_tc/link:"*) ;;
  *) export LIBRARY_PATH="$_mhc_tc/link${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
esac
# A separate target folder keeps the CPU build's artifacts valid: the features and the
# environment differ, and sharing one folder would rebuild candle back and forth.
export CARGO_TARGET_DIR="$_mhc_repo_root/target/cuda"

unset _mhc_repo_root _mhc_tc
