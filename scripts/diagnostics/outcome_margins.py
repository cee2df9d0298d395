"""How far does every outcome-dependent test clear its threshold, across seeds and thread counts?

A test whose verdict depends on a training or sampling outcome (a reward rises, a loss falls, a verifier passes
samples) takes the ``outcome_seed`` fixture and checks its result with ``conftest.assert_margin(effect,
required, …)``; pytest marks it ``outcome``. This script runs those tests (slow ones included) once per seed of
``--seeds`` under each thread count of ``--threads`` (``OMP_NUM_THREADS``; another CPU, or another thread count,
gives other floats), collects every logged ``effect / required`` and writes, per test and quantity, the smallest
and largest margin: the numbers the tests' docstrings quote. The project keeps every margin at 3× or more.

Writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (each quantity's margins, the 3× line) into ``--out-dir``:

    python scripts/diagnostics/outcome_margins.py --seeds 0,1,2 --threads 1,2
    python scripts/diagnostics/outcome_margins.py -k test_methods      # some of the tests only
    python scripts/diagnostics/outcome_margins.py --from-logs a.jsonl b.jsonl   # summarise earlier logs

A log is what the tests append to ``$DGPO_OUTCOME_LOG``; ``--from-logs`` summarises logs of runs made by hand
(e.g. ``DGPO_OUTCOME_SEEDS=0,1,2 DGPO_OUTCOME_LOG=a.jsonl OMP_NUM_THREADS=1 python -m pytest -m outcome …``),
the later row of a test, quantity, seed and thread count replacing an earlier one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dgpo.errors import UserError
from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json

TOOL = "outcome_margins"
REQUIRED_MARGIN = 3.0
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="outcome seeds, comma-separated (default 0,1,2)")
    p.add_argument("--threads", default="1,2", help="thread counts to run under, comma-separated (default 1,2)")
    p.add_argument("-k", dest="keyword", default="", help="only the tests pytest -k selects")
    p.add_argument("--from-logs", nargs="+", metavar="LOG", help="run nothing: summarise these margin logs")
    p.add_argument("--out-dir", default="runs/outcome_margins", help="output folder (default runs/outcome_margins)")
    p.add_argument("--name", default="outcome_margins", help="output file stem (default outcome_margins)")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run")
    return p.parse_args(argv)


def measure(seeds: str, threads: int, keyword: str) -> tuple[list[dict], int]:
    """Run the outcome tests under ``threads`` threads; every margin they logged, and pytest's exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "margins.jsonl"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DGPO_OUTCOME_SEEDS": seeds,
               "DGPO_OUTCOME_LOG": str(log)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "outcome", "tests"]
        if keyword:
            command += ["-k", keyword]
        status = subprocess.run(command, cwd=REPO, env=env).returncode
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return rows, status


def latest_rows(logs: list[str]) -> list[dict]:
    """The rows of margin logs, the last of each (test, quantity, thread count) kept."""
    kept: dict[tuple, dict] = {}
    for log in logs:
        for line in Path(log).read_text().splitlines():
            row = json.loads(line)
            kept[(row["test"], row["what"], row["threads"])] = row
    return list(kept.values())


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (test without its seed, quantity): the margins over seeds and threads."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        test = row["test"].split("[")[0]
        params = row["test"].split("[")[1].rstrip("]") if "[" in row["test"] else ""
        rest = "-".join(p for p in params.split("-") if not p.startswith("seed"))
        groups.setdefault((f"{test}[{rest}]" if rest else test, row["what"]), []).append(row)
    out = []
    for (test, what), rs in sorted(groups.items()):
        margins = [r["margin"] for r in rs]
        out.append({"test": test, "what": what, "required": rs[0]["required"], "runs": len(rs),
                    "threads": sorted({r["threads"] for r in rs}), "min_margin": min(margins),
                    "max_margin": max(margins), "min_effect": min(r["effect"] for r in rs),
                    "max_effect": max(r["effect"] for r in rs)})
    return out


def markdown(result: dict) -> str:
    lines = [f"Outcome tests, seeds {result['seeds']}, threads {result['threads']}; margin = effect / required "
             f"(the project asks ≥ {REQUIRED_MARGIN:g}×).", "",
             "| test | quantity | required | effect (min – max) | margin (min – max) | runs |", "|---|---|---|---|---|---|"]
    for e in result["tests"]:
        flag = "" if e["min_margin"] >= REQUIRED_MARGIN else " **below 3×**"
        lines.append(f"| `{e['test']}` | {e['what']} | {e['required']:.4g} | {e['min_effect']:.4g} – "
                     f"{e['max_effect']:.4g} | {e['min_margin']:.2f} – {e['max_margin']:.2f}{flag} | {e['runs']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = result["tests"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(entries) + 1.2))
    for i, e in enumerate(entries):
        ax.plot([e["min_margin"], e["max_margin"]], [i, i], "-o", color="tab:blue")
    ax.axvline(REQUIRED_MARGIN, color="tab:red", linestyle="--", label=f"{REQUIRED_MARGIN:g}×")
    ax.set_yticks(range(len(entries)), [f"{e['test'].split('::')[-1][:40]}: {e['what'][:30]}" for e in entries],
                  fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("margin = effect / required (min – max over seeds and threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    files = report_files(args.out_dir, args.name)
    try:
        check_report_outputs(files[0], files[1:], TOOL, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, statuses, started = [], {}, time.time()
    if args.from_logs:
        rows = latest_rows(args.from_logs)
        threads = sorted({r["threads"] for r in rows})
        seeds = ",".join(sorted({r["test"].split("[seed")[1].split("-")[0].split("]")[0] for r in rows
                                 if "[seed" in r["test"]}, key=int))
    else:
        threads, seeds = [int(t) for t in args.threads.split(",")], args.seeds
        for t in threads:
            got, statuses[t] = measure(seeds, t, args.keyword)
            rows += got
    result = {"seeds": seeds, "threads": threads, "keyword": args.keyword, "pytest_status": statuses,
              "logs": [Path(f).name for f in args.from_logs or []], "minutes": (time.time() - started) / 60,
              "tests": summarise(rows), "rows": rows}
    try:
        write_report_json(files, result, TOOL, args.overwrite)
    except UserError as e:  # the folder changed during the work
        print(f"error: {e}", file=sys.stderr)
        return 2
    files[1].write_text(markdown(result))
    plot(result, files[2])
    print(markdown(result))
    low = [e for e in result["tests"] if e["min_margin"] < REQUIRED_MARGIN]
    print(f"{len(result['tests'])} quantities, {len(low)} below {REQUIRED_MARGIN:g}×; written to {files[0]}")
    return 1 if low or any(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
