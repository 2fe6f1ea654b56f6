"""Render a pytest-benchmark JSON from the fastvit suites as markdown tables and PNG plots.

    python -m benchmarks.report RESULTS.json [--out DIR]

Writes ``<stem>.md`` (and prints it) plus ``<stem>-<suite>-throughput.png`` and
``<stem>-<suite>-speedup.png`` into DIR (default: next to the JSON). For each suite: a table with a
row per case (model/op × shape × batch) and, per candidate, its throughput and its speedup over each
baseline measured in the same run (timm eager, timm + torch.compile, ...); then a roofline table:
median time next to the FLOP floor and the byte floor computed from the shapes and the device's
measured peaks, and the fraction of the limit reached.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

BASELINE_PREFIXES = ("timm", "torch", "sdpa")  # candidates named so are baselines (see harness.record)


def is_baseline(candidate: str) -> bool:
    return candidate.startswith(BASELINE_PREFIXES)


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" not in data or "machine_info" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks'/'machine_info')")
    return data


def _rows(data: dict) -> list[dict]:
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "suite" not in info:
            continue
        stats = bench.get("stats") or {}
        rows.append({**info, "name": bench["name"], "median_s": stats.get("median", info.get("median_s"))})
    return rows


def throughput(row: dict) -> tuple[float | None, str]:
    """The figure a reader wants for this row: items/s, else TFLOP/s, else GB/s."""
    median = row.get("median_s")
    if not median:
        return None, ""
    primary = row.get("primary")
    if primary == "gbps" and row.get("bytes"):
        return row["bytes"] / median / 1e9, "GB/s"
    if primary == "tflops" and row.get("flops"):
        return row["flops"] / median / 1e12, "TFLOP/s"
    if row.get("items"):
        return row["items"] / median, f"{row.get('item_name', 'item')}/s"
    if row.get("flops"):
        return row["flops"] / median / 1e12, "TFLOP/s"
    if row.get("bytes"):
        return row["bytes"] / median / 1e9, "GB/s"
    return 1.0 / median, "calls/s"


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _header(data: dict, path: str) -> list[str]:
    info = data["machine_info"]
    peaks = info.get("peaks", {})
    lines = [
        f"# fastvit benchmarks: {info.get('device', '?')}",
        "",
        f"- source: `{os.path.basename(path)}`, {data.get('datetime', '')}",
        f"- torch {info.get('torch')}, triton {info.get('triton')}, CUDA {info.get('cuda')}, fastvit "
        f"{info.get('fastvit')}, commit `{info.get('git_commit')}`",
    ]
    if info.get("driver"):
        lines.append(f"- driver {info['driver']}, SM clock {info.get('sm_clock')} (max {info.get('sm_clock_max')})")
    if peaks:
        lines.append(
            f"- measured peaks: {peaks['matmul_tflops']:.1f} TFLOP/s dense {peaks['matmul_dtype']} matmul, "
            f"{peaks['copy_gbps']:.0f} GB/s copy bandwidth (MFU and floors are relative to these)"
        )
    if info.get("smoke_mode"):
        lines.append("- **smoke mode** (no GPU): tiny shapes on a CPU; this shows the format, not GPU performance")
    return lines


def render(data: dict, path: str) -> tuple[str, dict[str, list[dict]]]:
    rows = _rows(data)
    suites: OrderedDict[str, list[dict]] = OrderedDict()
    for row in rows:
        suites.setdefault(row["suite"], []).append(row)
    lines = _header(data, path)
    if not any(r.get("median_s") for r in rows):
        lines += ["", "No timings in this file (it was run with --benchmark-disable): nothing to report."]
        return "\n".join(lines) + "\n", suites
    for suite, suite_rows in suites.items():
        lines += ["", f"## {suite}", ""]
        lines += _throughput_table(suite_rows)
        lines += ["", f"### {suite}: roofline", ""]
        lines += _roofline_table(suite_rows)
    return "\n".join(lines) + "\n", suites


def _by_case(rows: list[dict]) -> tuple[OrderedDict, list[str]]:
    cases: OrderedDict[str, dict[str, dict]] = OrderedDict()
    candidates: list[str] = []
    for row in rows:
        if row.get("median_s") is None:
            continue
        cases.setdefault(row["case"], {})[row["candidate"]] = row
        if row["candidate"] not in candidates:
            candidates.append(row["candidate"])
    return cases, candidates


def _throughput_table(rows: list[dict]) -> list[str]:
    cases, candidates = _by_case(rows)
    unit = next((throughput(r)[1] for r in rows if r.get("median_s")), "")
    baselines = [c for c in candidates if is_baseline(c)]
    header = "| case | " + " | ".join(candidates) + " |"
    lines = [
        f"Throughput in {unit}; `×a / ×b` = speedup over " + (", ".join(baselines) or "(no baseline)") + ".",
        "",
        header,
        "|" + "---|" * (len(candidates) + 1),
    ]
    for case, by_candidate in cases.items():
        cells = []
        for candidate in candidates:
            row = by_candidate.get(candidate)
            if row is None:
                cells.append("–")
                continue
            value = throughput(row)[0]
            ratios = [
                f"×{by_candidate[b]['median_s'] / row['median_s']:.2f}"
                for b in baselines
                if b in by_candidate and b != candidate
            ]
            cells.append(_fmt(value) + (f" ({' / '.join(ratios)})" if ratios and candidate not in baselines else ""))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def _roofline_table(rows: list[dict]) -> list[str]:
    lines = [
        "| case | candidate | median ms | FLOP floor ms | byte floor ms | % of limit | MFU | extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        median = row.get("median_s")
        if not median:
            continue
        flop_floor, byte_floor = row.get("flop_floor_s"), row.get("byte_floor_s")
        limit = max(f for f in (flop_floor, byte_floor, 0.0) if f is not None)
        mfu = (
            row["flops"] / median / 1e12 / row["peaks"]["matmul_tflops"]
            if row.get("flops") and row.get("peaks")
            else None
        )
        extra = []
        if row.get("peak_memory_gib") is not None:
            extra.append(f"peak {row['peak_memory_gib']:.2f} GiB")
        lines.append(
            f"| {row['case']} | {row['candidate']} | {1e3 * median:.3f} | "
            f"{_fmt(1e3 * flop_floor) if flop_floor else '–'} | {_fmt(1e3 * byte_floor) if byte_floor else '–'} | "
            f"{f'{100 * limit / median:.0f}%' if limit else '–'} | {f'{100 * mfu:.1f}%' if mfu else '–'} | "
            f"{', '.join(extra)} |"
        )
    return lines


def plot(suites: dict[str, list[dict]], out_dir: str, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite, rows in suites.items():
        rows = [r for r in rows if r.get("median_s")]
        if not rows:
            continue
        # Throughput vs batch, one line per candidate, one panel per (model/op, mode) group.
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for row in rows:
            key = " ".join(str(row.get(k)) for k in ("model", "op", "mode") if row.get(k) is not None) or row["case"]
            groups.setdefault(key, []).append(row)
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (key, group) in zip(axes[0], groups.items()):
            for candidate in OrderedDict.fromkeys(r["candidate"] for r in group):
                points = sorted(
                    (r.get("batch", i), throughput(r)[0]) for i, r in enumerate(group) if r["candidate"] == candidate
                )
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=candidate)
            ax.set(title=key, xlabel="batch", ylabel=throughput(group[0])[1])
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{suite}-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        # Speedup bars over the first baseline of each case.
        cases, candidates = _by_case(rows)
        baselines = [c for c in candidates if is_baseline(c)]
        if not baselines:
            continue
        base = baselines[0]
        others = [c for c in candidates if c != base]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
        width = 0.8 / max(len(others), 1)
        for i, candidate in enumerate(others):
            values = [
                cases[c][base]["median_s"] / cases[c][candidate]["median_s"]
                if base in cases[c] and candidate in cases[c]
                else 0
                for c in cases
            ]
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=candidate)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(cases))], list(cases), rotation=30, ha="right", fontsize=7
        )
        ax.set(ylabel=f"speedup over {base}", title=f"{suite}: speedup over {base}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{suite}-speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=None, help="output directory (default: the JSON's)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.results):
        parser.error(f"{args.results} not found")
    try:
        data = load(args.results)
    except (ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.results))[0]
    markdown, suites = render(data, args.results)
    pngs = plot(suites, out_dir, stem)
    if pngs:
        markdown += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {md_path}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
