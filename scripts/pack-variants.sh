#!/usr/bin/env bash
# Packs variant builds (scripts/build-variant.sh) into one archive, .bin/variants.tar.xz, so that
# one `scripts/device-check.sh variants` call measures them all. The builds differ only in their
# kernels and a little Rust, so one xz stream whose window spans several binaries stores each
# further build as its differences: about 1.2 MB more per build instead of 17 MB, a dozen builds
# in the device tool's 64 MiB carry where three fit as separate files.
#
#   scripts/pack-variants.sh FOLDER...   every FOLDER/NAME/ build; a NAME found in two folders
#                                        must be the same commit (it is packed once)
#
# Carry .bin/variants.tar.xz; the variants stage unpacks it and measures every build in it.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if (($# == 0)) || [[ "$1" == -h || "$1" == --help ]]; then
  sed -n '2,11p' "${BASH_SOURCE[0]}"
  exit 2
fi
cd "$repo_root"
archive=.bin/variants.tar.xz
# What the device tool carries besides the archive is the tracked tree (a few MB).
max_bytes=$((56 * 1024 * 1024))
executables=(mhc-train-cuda test-gpu_sublayer-cuda)

stage="$(mktemp -d)"
trap 'rm -rf "$stage" "$archive.tmp"' EXIT
declare -A commit_of
names=()
for folder in "$@"; do
  found=0
  for dir in "$folder"/*/; do
    [[ -f "$dir/commit" ]] || continue
    found=1
    name="$(basename "$dir")"
    commit="$(cat "$dir/commit")"
    if [[ -n "${commit_of[$name]:-}" ]]; then
      if [[ "${commit_of[$name]}" != "$commit" ]]; then
        echo "pack-variants: '$name' is commit ${commit_of[$name]} in one folder and $commit in $folder; rename one" >&2
        exit 1
      fi
      continue
    fi
    for exe in "${executables[@]}"; do
      if [[ ! -f "$dir/$exe.xz" ]]; then
        echo "pack-variants: $dir has no $exe.xz (scripts/build-variant.sh makes it)" >&2
        exit 1
      fi
    done
    commit_of[$name]="$commit"
    names+=("$name")
    mkdir "$stage/$name"
    cp "$dir/commit" "$stage/$name/"
    for exe in "${executables[@]}"; do
      xz -dc "$dir/$exe.xz" >"$stage/$name/$exe"
      chmod +x "$stage/$name/$exe"
    done
  done
  if ((found == 0)); then
    echo "pack-variants: no builds (NAME/commit) in $folder" >&2
    exit 1
  fi
done

# Members grouped by executable, so that each binary follows its twin of the build before (68 MB
# back, well inside the 512 MiB window); xz's fast preset, single-threaded (its threads would cut
# the stream into blocks that cannot refer to each other).
members=()
for name in "${names[@]}"; do members+=("$name/commit"); done
for exe in "${executables[@]}"; do
  for name in "${names[@]}"; do members+=("$name/$exe"); done
done
tar -cf - -C "$stage" "${members[@]}" | xz -T1 --lzma2=preset=1,dict=512MiB >"$archive.tmp"
size=$(stat -c %s "$archive.tmp")
if ((size > max_bytes)); then
  echo "pack-variants: ${#names[@]} builds take $((size / 1024 / 1024)) MiB, over the $((max_bytes / 1024 / 1024)) MiB that the carry leaves; pack fewer" >&2
  exit 1
fi
mv "$archive.tmp" "$archive"
echo "pack-variants: $archive ($((size / 1024 / 1024)) MiB): ${names[*]}"
