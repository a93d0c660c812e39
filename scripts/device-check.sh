#!/usr/bin/env bash
# The GPU machine's whole check in one call: a lease is short and every call pays a machine start,
# so the stages that belong together run back to back here, each under its own time limit, and
# each leaves one log under the output folder ($OUT on the device tool; ./device-out elsewhere).
#
#   scripts/build-cuda.sh --tests --pack           # here, without a GPU
#   scripts/device-check.sh selftest layers train  # there (carry .bin/mhc-cuda-bins.tar.xz)
#
# Stages (any order, each at most once; the table at the end sums them up):
#   selftest   fused kernels vs the f64 reference on fresh inputs      -> selftest.log
#   tests      the GPU test executables (tests/gpu_*.rs, not ignored)  -> tests.log
#   layers     bench: the layer and op tables                          -> layers.md, layers.json
#   train      bench --train on configs/small.toml (plain/ref/fused)   -> train.md
#   agree      small.toml, 40 steps of fused and of reference mHC in
#              micro-batches of one sequence (the reference's memory),
#              their losses side by side                               -> agree.log
#   ncu        Nsight Compute on the fused sublayer's kernels at
#              T=1024 C=2560 and T=16384 C=1280                        -> ncu.txt
#   timeline   every kernel of one fused sublayer forward+backward (as
#              the bench times it) with its duration, and the host's
#              enqueue times, at T=1024 C=2560 and T=16384 C=1280, and
#              a table of the kernels with their sum at the end          -> timeline.txt
#   source     Nsight Compute's full set, per SASS instruction (issue
#              counts, stall samples), of the kernels furthest from the
#              copy roof: the coefficient backward over x, the projection,
#              and the two per-token Sinkhorn kernels (SOURCE_KERNELS:
#              another regex), at T=16384 C=1280
#                                      -> source-sass.csv.xz, source-details.csv
#   variants   each build in .bin/variants.tar.xz (scripts/pack-variants.sh:
#              a dozen builds in one carry) or else in .bin/variants/NAME/
#              (scripts/build-variant.sh; carry .bin/variants, or another
#              folder of builds named by VARIANTS_DIR; 3 builds per carry):
#              its selftest, then the timeline's one-step profile of every
#              variant side by side at T=1024 C=1280, T=16384 C=1280 and
#              T=1024 C=2560, the variants in turn, twice; the table is
#              rewritten after each size, so a call cut short keeps the
#              sizes it finished                                         -> variants.txt
# STAGE_LIMIT_S (default 300) bounds each stage; a stage that fails or runs out is reported and
# the next one still runs. At most 8 files come back from $OUT, so the stages write no more.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out="${OUT:-$repo_root/device-out}"
mkdir -p "$out"
limit="${STAGE_LIMIT_S:-300}"
bin=.bin/mhc-train-cuda
variants="${VARIANTS_DIR:-.bin/variants}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if (($# == 0)); then
  sed -n '2,37p' "${BASH_SOURCE[0]}"
  exit 2
fi
for stage in "$@"; do
  case "$stage" in
    selftest | tests | layers | train | agree | ncu | timeline | source | variants) ;;
    *)
      echo "device-check: unknown stage '$stage' (selftest tests layers train agree ncu timeline source variants)" >&2
      exit 2
      ;;
  esac
done

# Unpacks the carried archive and prints the GPU, driver and clocks; fails here, once, if the
# binaries are missing or cannot load their libraries (a variants-only run carries no archive).
if [[ -f .bin/mhc-cuda-bins.tar.xz || -x "$bin" || " $* " != *" variants "* ]]; then
  scripts/gpu-run.sh "$bin" --version || exit 1
fi
run() { timeout --signal=INT --kill-after=20 "$limit" scripts/gpu-run.sh "$@"; }

# The losses of two runs' metrics.jsonl, step by step, and the largest difference.
compare_losses() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
def losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
    return out
fused, reference = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(fused) & set(reference))
print("| step | fused loss | reference loss | difference |")
print("|---|---|---|---|")
for s in steps:
    print(f"| {s} | {fused[s]:.5f} | {reference[s]:.5f} | {fused[s] - reference[s]:+.5f} |")
if steps:
    print(f"largest |difference| over {len(steps)} logged steps: "
          f"{max(abs(fused[s] - reference[s]) for s in steps):.5f}")
EOF
}

# One sublayer step under Nsight Compute, each kernel's duration as raw CSV (the timeline and
# variants stages): run_step EXECUTABLE TOKENS WIDTH.
run_step() {
  MHC_BENCH_TOKENS=$2 MHC_BENCH_WIDTHS=$3 \
    run ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
    --csv --page raw "$1" chained_sublayer_one_step_profile --ignored --exact --nocapture
}

# FILE.xz -> FILE, executable (xz where the machine has it, else Python's lzma).
unpack_xz() {
  if command -v xz >/dev/null; then
    xz -dkf "$1"
  else
    python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[1][:-3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$1"
  fi
  chmod +x "${1%.xz}"
}

declare -A result
for stage in "$@"; do
  start=$SECONDS
  echo "== device-check: $stage (limit $limit s)"
  case "$stage" in
    selftest)
      run "$bin" selftest 2>&1 | tee "$out/selftest.log"
      ;;
    tests)
      status=0
      for exe in .bin/test-gpu_*-cuda; do
        echo "-- $exe" | tee -a "$out/tests.log"
        run "$exe" --test-threads=1 2>&1 | tee -a "$out/tests.log" || status=1
      done
      ((status == 0))
      ;;
    layers)
      run "$bin" bench --out "$work/layers" 2>&1 | tail -n 40 &&
        cp "$work/layers/bench.md" "$out/layers.md" &&
        cp "$work/layers/bench.json" "$out/layers.json"
      ;;
    train)
      run "$bin" bench --train --config configs/small.toml --out "$work/train" 2>&1 | tail -n 40 &&
        cp "$work/train/bench.md" "$out/train.md"
      ;;
    agree)
      for impl in fused reference; do
        run "$bin" --config configs/small.toml --set "name=\"agree-$impl\"" \
          --set "run_dir=\"$work\"" --set model.mhc_impl="\"$impl\"" --set train.steps=40 \
          --set train.grad_accum=16 --set log.every=1 --set log.eval_every=0 2>&1 | tail -n 5 || true
      done
      compare_losses "$work/agree-fused/metrics.jsonl" "$work/agree-reference/metrics.jsonl" |
        tee "$out/agree.log"
      ;;
    ncu)
      # The ignored bench test times each fused op alone (MHC_BENCH_OPS_ONLY), bf16 first; with
      # one timed call per op (2 warm-up calls before it) the first 90 matching launches cover
      # every bf16 kernel of the sublayer.
      : >"$out/ncu.txt"
      for size in "1024 2560" "16384 1280"; do
        read -r tokens width <<<"$size"
        echo "-- T=$tokens C=$width" >>"$out/ncu.txt"
        MHC_BENCH_OPS_ONLY=1 MHC_BENCH_REPS=1 MHC_BENCH_TOKENS=$tokens MHC_BENCH_WIDTHS=$width \
          run ncu --clock-control none --kernel-name 'regex:mhc_|rms_norm' --launch-count 90 \
          --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section MemoryWorkloadAnalysis --section WarpStateStats --csv --page details \
          .bin/test-gpu_mhc-cuda bench_fused_vs_reference --ignored --exact >>"$out/ncu.txt" 2>&1
      done
      ;;
    timeline)
      : >"$out/timeline.txt"
      for size in "1024 2560" "16384 1280"; do
        read -r tokens width <<<"$size"
        echo "-- T=$tokens C=$width" >>"$out/timeline.txt"
        run_step .bin/test-gpu_sublayer-cuda "$tokens" "$width" >>"$out/timeline.txt" 2>&1
      done
      python3 scripts/timeline-table.py --launches "$out/timeline.txt" | tee -a "$out/timeline.txt"
      ;;
    source)
      # One sublayer step as the timeline profiles it; the report stays in the scratch folder
      # (only its two exports come back: the instruction table, compressed, and the sections).
      MHC_BENCH_TOKENS=16384 MHC_BENCH_WIDTHS=1280 \
        run ncu --clock-control none --profile-from-start off --set full \
        --kernel-name "regex:${SOURCE_KERNELS:-bwd_x_sum|project|finish|bwd_token}" -o "$work/source" \
        .bin/test-gpu_sublayer-cuda chained_sublayer_one_step_profile --ignored --exact --nocapture &&
        run ncu -i "$work/source.ncu-rep" --page source --csv --print-source sass |
        xz >"$out/source-sass.csv.xz" &&
        run ncu -i "$work/source.ncu-rep" --page details --csv >"$out/source-details.csv"
      ;;
    variants)
      if [[ -f .bin/variants.tar.xz ]]; then
        variants=$work/variants
        mkdir -p "$variants"
        if command -v xz >/dev/null; then
          tar -xJf .bin/variants.tar.xz -C "$variants"
        else
          python3 -m tarfile -e .bin/variants.tar.xz "$variants"
        fi
      fi
      names=()
      for dir in "$variants"/*/; do
        [[ -f "$dir/test-gpu_sublayer-cuda.xz" || -f "$dir/test-gpu_sublayer-cuda" ]] && names+=("$(basename "$dir")")
      done
      scripts/gpu-run.sh >"$work/variants-head.txt" 2>/dev/null  # the GPU, driver and clocks
      status=0
      if ((${#names[@]} == 0)); then
        echo "device-check: no .bin/variants.tar.xz (scripts/pack-variants.sh) and no $variants/NAME/ (scripts/build-variant.sh) carried" |
          tee "$out/variants.txt"
        status=1
      fi
      for name in "${names[@]}"; do
        dir=$variants/$name
        for exe in mhc-train-cuda test-gpu_sublayer-cuda; do
          [[ ! -f "$dir/$exe.xz" ]] || unpack_xz "$dir/$exe.xz" || status=1
        done
        echo "== $name (commit $(cat "$dir/commit" 2>/dev/null || echo '?')): selftest" >>"$work/variants-head.txt"
        run "$dir/mhc-train-cuda" selftest 2>&1 | tail -n 2 >>"$work/variants-head.txt" || status=1
        cp "$work/variants-head.txt" "$out/variants.txt"
      done
      # The variants in turn, twice, so that a drift of the clocks or of the machine's load
      # shows up as a spread of one variant's repetitions rather than as a gap between two.
      for size in "1024 1280" "16384 1280" "1024 2560"; do
        read -r tokens width <<<"$size"
        for rep in 1 2; do
          for name in "${names[@]}"; do
            echo "-- $name T=$tokens C=$width rep=$rep" >>"$work/variants-raw.txt"
            run_step "$variants/$name/test-gpu_sublayer-cuda" "$tokens" "$width" \
              >>"$work/variants-raw.txt" 2>&1 || status=1
          done
        done
        { cat "$work/variants-head.txt" && python3 scripts/timeline-table.py "$work/variants-raw.txt"; } >"$out/variants.txt"
      done
      cat "$out/variants.txt"
      ((status == 0))
      ;;
  esac
  code=$?
  result[$stage]="$( ((code == 0)) && echo ok || echo "FAILED (exit $code)") in $((SECONDS - start)) s"
done

echo "== device-check summary (outputs in $out)"
for stage in "$@"; do
  echo "$stage: ${result[$stage]}"
done
