#!/usr/bin/env python3
"""Tables of one-step sublayer timelines (`scripts/device-check.sh` timeline and variants).

Input: a file of sections, each a "-- TITLE" line followed by Nsight Compute's raw CSV (--csv
--page raw, metric gpu__time_duration.sum).

  timeline-table.py FILE             titles "VARIANT T=<tokens> C=<width> rep=<n>": per size, one
                                     row per kernel (name without the mhc_ prefix and the bf16/f32
                                     and n suffixes), one column per variant with the fastest and
                                     slowest repetition in microseconds, and the step's total
  timeline-table.py --launches FILE  per section, every launch in order with its grid, block and
                                     microseconds, and their total
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


def launches(csv_lines):
    """The profiled launches of one section (ncu's units row left out), in order."""
    rows = csv.DictReader(io.StringIO("\n".join(csv_lines)))
    return [row for row in rows if row.get("ID", "").isdigit()]


def microseconds(row):
    return float(row["gpu__time_duration.sum"].replace(",", "")) / 1000


def kernel_times(csv_lines):
    """Kernel name -> microseconds (summed over launches) of one profiled step."""
    times = {}
    for row in launches(csv_lines):
        name = row["Kernel Name"].split("(")[0]
        name = re.sub(r"^mhc_|_(bf16|f32)|_n\d$", "", name)
        times[name] = times.get(name, 0.0) + microseconds(row)
    return times


def print_launches(path):
    for title, csv_lines in sections(open(path).read().splitlines()):
        rows = launches(csv_lines)
        if not rows:
            print(f"{title}: no kernels found")
            continue
        print(f"| {title} | grid | block | us |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['Kernel Name'][:48]} | {row['Grid Size']} | {row['Block Size']} | {microseconds(row):.1f} |")
        print(f"| total ({len(rows)} kernels) | | | {sum(map(microseconds, rows)):.1f} |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--launches":
        print_launches(sys.argv[2])
        return
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
