#!/usr/bin/env python3
"""Side-by-side table of one-step sublayer timelines (`scripts/device-check.sh variants`).

Input: a file of sections, each a line "-- VARIANT T=<tokens> C=<width> rep=<n>" followed by
Nsight Compute's raw CSV (--csv --page raw, metric gpu__time_duration.sum). Output, per size:
one row per kernel (name without the mhc_ prefix and the bf16/f32 and n suffixes), one column
per variant with the fastest and slowest repetition in microseconds, and the step's total.
"""
import csv
import io
import re
import sys


def sections(lines):
    """(title, csv lines) of each "-- " section."""
    out = []
    for line in lines:
        if line.startswith("-- "):
            out.append((line[3:].strip(), []))
        elif line.startswith('"') and out:
            out[-1][1].append(line)
    return out


def kernel_times(csv_lines):
    """Kernel name -> microseconds (summed over launches) of one profiled step."""
    times = {}
    for row in csv.DictReader(io.StringIO("\n".join(csv_lines))):
        if not row.get("ID", "").isdigit():
            continue  # ncu's units row
        name = row["Kernel Name"].split("(")[0]
        name = re.sub(r"^mhc_|_(bf16|f32)|_n\d$", "", name)
        times[name] = times.get(name, 0.0) + float(row["gpu__time_duration.sum"].replace(",", "")) / 1000
    return times


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = {}  # size -> variant -> [kernel times per repetition]
    for title, csv_lines in sections(open(sys.argv[1]).read().splitlines()):
        match = re.match(r"(\S+) (T=\d+ C=\d+)", title)
        times = kernel_times(csv_lines)
        if match and times:
            variant, size = match.groups()
            runs.setdefault(size, {}).setdefault(variant, []).append(times)
    if not runs:
        sys.exit("timeline-table: no profiled steps found")
    for size, variants in runs.items():
        kernels = list(dict.fromkeys(k for reps in variants.values() for times in reps for k in times))
        print(f"\n{size} (us, fastest/slowest of the repetitions)")
        print(f"| kernel | {' | '.join(variants)} |")
        print("|---" * (len(variants) + 1) + "|")
        for kernel in kernels + ["total"]:
            cells = []
            for reps in variants.values():
                values = [sum(t.values()) if kernel == "total" else t.get(kernel, 0.0) for t in reps]
                cells.append(f"{min(values):.1f}/{max(values):.1f}")
            print(f"| {kernel} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
