"""Peak memory of every recipe on the shapes world, and what the memory levers save.

Runs each recipe as its own process for a few steps (with its evaluations: a full evaluation batch of 128
images at the start and the end), and reads that process's peak resident memory from the kernel
(``os.wait4``'s ``ru_maxrss``): the number to compare with a machine's RAM, or to set ``run.max_memory_gb``
from. Rows: the main job (``dgpo train``), the three baselines, DGPO with gradient checkpointing and with
smaller micro-batches, ``tdm-r1 distill`` at two batch sizes, ``tdm-r1 train`` from that student, and the
interpreter with the package imported (the floor every row includes).

Writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` into ``--out-dir``:

    python scripts/memory_profile.py --steps 3
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dgpo.cli_args import at_least
from dgpo.errors import UserError
from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json

ROOT = Path(__file__).resolve().parents[1]
TOOL = "memory_profile"
#: A short run of a recipe: a few steps, evaluations with a full first sampler batch (128 images), no cache.
SHORT = ["run.time_budget_min=0", "eval.every=1000000", "eval.every_minutes=0", "eval.per_prompt=4",
         "run.checkpoint_every=1000000"]


def rows(steps: int, work: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) of every measured process, in order (``tdm-r1 train`` starts from the first TDM run)."""
    dgpo = ["dgpo", "train", "--set", f"run.epochs={steps}", "--set", "eval.cache_initial=false"]
    tdm = ["tdm-r1", "distill", "--set", f"run.iterations={steps}"]
    sets = lambda *kv: sum((["--set", x] for x in (*SHORT, *kv)), [])  # noqa: E731
    return [
        ("python + dgpo imported (the floor)", [sys.executable, "-c", "import dgpo.trainer, tdm_r1.distill"]),
        ("dgpo train (the main job: DGPO, micro-batch 64)", [*dgpo, *sets(), "--out", str(work / "dgpo")]),
        ("DGPO, gradient checkpointing", [*dgpo, *sets("model.gradient_checkpointing=true"),
                                          "--out", str(work / "dgpo-gc")]),
        ("DGPO, micro-batch 16", [*dgpo, *sets("optim.micro_batch=16"), "--out", str(work / "dgpo-mb16")]),
        ("DGPO, micro-batch 16 + gradient checkpointing",
         [*dgpo, *sets("optim.micro_batch=16", "model.gradient_checkpointing=true"), "--out", str(work / "dgpo-both")]),
        ("Flow-GRPO", [*dgpo[:2], "configs/flow_grpo/shapes.yaml", *dgpo[2:], *sets(), "--out", str(work / "grpo")]),
        ("Diffusion-DPO", [*dgpo[:2], "configs/diffusion_dpo/shapes.yaml", *dgpo[2:], *sets(),
                           "--out", str(work / "dpo")]),
        ("DiffusionNFT", [*dgpo[:2], "configs/nft/shapes.yaml", *dgpo[2:], *sets(), "--out", str(work / "nft")]),
        ("tdm-r1 distill (batch 32)", [*tdm, *sets(), "--out", str(work / "tdm")]),
        ("tdm-r1 distill, batch 16", [*tdm, *sets("optim.batch_size=16"), "--out", str(work / "tdm-b16")]),
        ("tdm-r1 train (TDM-R1, batch 32)", ["tdm-r1", "train", "--set", f"run.iterations={steps}",
                                             *sets(f"r1.init_run={work / 'tdm'}"), "--out", str(work / "r1")]),
    ]


#: Runs its arguments as a child and writes that child's peak resident memory (KiB) and exit status to the file
#: named by MEMORY_PROFILE_OUT. A process forked from a large one inherits its high-water mark (Linux keeps
#: ru_maxrss across exec), so the measured process is forked from this small launcher instead.
LAUNCHER = ("import os, subprocess, sys\n"
            "child = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(child.pid, 0)\n"
            "with open(os.environ['MEMORY_PROFILE_OUT'], 'w') as f:\n"
            "    f.write(f'{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')\n")


def peak_rss_of(argv: list[str], log: Path) -> tuple[float, int, float]:
    """Run ``argv`` (its output to ``log``); its peak resident memory in GiB, exit status and seconds."""
    start = time.perf_counter()
    answer = log.with_suffix(".peak")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                       env={**os.environ, "TQDM_DISABLE": "1", "MEMORY_PROFILE_OUT": str(answer)}, check=True)
    kib, status = answer.read_text().split()
    return int(kib) / 2 ** 20, int(status), time.perf_counter() - start


def write_report(results: list[dict], out_dir: Path, name: str, command: str, overwrite: bool = False) -> list[Path]:
    """Write the report (a JSON this script wrote before is replaced with ``overwrite``; nothing else is)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    json_path, md_path, png_path = report_files(out_dir, name)
    record = {"command": command, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only", "rows": results}
    write_report_json([json_path, md_path, png_path], record, TOOL, overwrite)
    lines = [f"`{command}` ({record['machine']}, {record['date']})", "",
             "| process | peak resident memory (GiB) | seconds |", "|---|---|---|",
             *[f"| {r['label']} | {r['peak_rss_gb']:.2f} | {r['seconds']:.0f} |" for r in results]]
    md_path.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(results) + 1))
    ax.barh([r["label"] for r in results][::-1], [r["peak_rss_gb"] for r in results][::-1], color="tab:blue")
    ax.set(xlabel="peak resident memory (GiB)", title="peak memory per process, shapes world, CPU")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, md_path, png_path]


def measure(steps: int) -> list[dict] | None:
    """Every row's peak memory, seconds and command; None (its log's end printed) when a row's process fails."""
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-profile-") as tmp:
        work = Path(tmp)
        for label, cmd in rows(steps, work):
            peak, rc, seconds = peak_rss_of(cmd, work / f"{len(results)}.log")
            if rc != 0:
                print((work / f"{len(results)}.log").read_text()[-3000:], file=sys.stderr)
                print(f"{label}: exit status {rc}", file=sys.stderr)
                return None
            results.append({"label": label, "peak_rss_gb": round(peak, 3), "seconds": round(seconds, 1),
                            "argv": [str(a).replace(str(work), "WORK") for a in cmd[1 if cmd[0] == sys.executable else 0:]]})
            print(f"{label}: {peak:.2f} GiB in {seconds:.0f} s", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=at_least(1), default=3, help="training steps per recipe (default 3)")
    p.add_argument("--out-dir", default="runs/memory_profile", help="output folder (default runs/memory_profile)")
    p.add_argument("--name", default="memory_profile")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run")
    args = p.parse_args(argv)
    command = f"python scripts/memory_profile.py --steps {args.steps}"  # where it writes changes nothing measured
    json_path, *companions = report_files(Path(args.out_dir), args.name)
    try:  # refused before the work, and checked again when written (the folder may change meanwhile)
        check_report_outputs(json_path, companions, TOOL, args.overwrite)
        results = measure(args.steps)
        if results is None:
            return 1
        paths = write_report(results, Path(args.out_dir), args.name, command, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
