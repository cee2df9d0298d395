"""Fingerprint short fixed-seed runs of every recipe: a hash of each checkpoint tensor.

A change that should move no number (a re-house of the code, a rename) must leave every fingerprint equal:

    OMP_NUM_THREADS=1 python scripts/diagnostics/fingerprint_runs.py --out before.json
    ... change the code ...
    OMP_NUM_THREADS=1 python scripts/diagnostics/fingerprint_runs.py --out after.json --compare before.json

Runs, on the shipped base, fp32 on the CPU: DGPO, Flow-GRPO, Diffusion-DPO and DiffusionNFT for 2 epochs each
(`dgpo train`), TDM for 3 iterations (`tdm-r1 distill`), the surrogate alone for 2 (`tdm-r1 surrogate`), and
TDM-R1 for 2 iterations from the TDM run (`tdm-r1 train`). Each writes a checkpoint at its last step; the
fingerprint is the SHA-256 of every tensor in it (and of the final LoRA files) and of every metrics row
(its clocks left out: NFE, losses, rewards and evaluations are in). About 3 minutes on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

SMALL_EVAL = ["eval.per_prompt=1", "eval.fd=false", "eval.every=1000"]
DGPO_RUN = ["run.time_budget_min=0", "run.epochs=2", "run.checkpoint_every=2", "eval.every_minutes=0",
            "rollout.prompts_per_epoch=2", "rollout.group_size=4", "rollout.steps=4", *SMALL_EVAL,
            "eval.sampler.steps=4"]
TDM_RUN = ["run.time_budget_min=0", "optim.batch_size=8", *SMALL_EVAL, "eval.every_minutes=0"]
METHODS = {"dgpo": "configs/dgpo/shapes.yaml", "flow_grpo": "configs/flow_grpo/shapes.yaml",
           "diffusion_dpo": "configs/diffusion_dpo/shapes.yaml", "nft": "configs/nft/shapes.yaml"}


def _sets(keys):
    return [a for k in keys for a in ("--set", k)]


def tensor_hashes(run: Path) -> dict[str, str]:
    """SHA-256 of every tensor of the run's last checkpoint and of its weights files (final/ and the surrogate's
    LoRA), and every metrics row without its clocks (as JSON)."""
    hashes = {}
    checkpoints = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    files = [*[c / "tensors.safetensors" for c in checkpoints[-1:]], *sorted(run.glob("*/*.safetensors")),
             *sorted((run / "final").rglob("*.safetensors"))]
    for file in files:
        for key, tensor in sorted(load_file(str(file)).items()):
            digest = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
            hashes[f"{file.relative_to(run)}:{key}"] = digest
    timing = ("train_seconds", "peak_memory_gb")
    metrics = run / "metrics.jsonl"
    for i, line in enumerate(metrics.read_text().splitlines() if metrics.is_file() else []):
        kept = {k: v for k, v in json.loads(line).items() if k not in timing and not k.endswith("_s")}  # not clocks
        hashes[f"metrics.jsonl:{i}"] = json.dumps(kept, sort_keys=True)
    if (run / "ranking.json").is_file():  # the surrogate's Kendall τ on fresh rollouts (not the paths beside)
        evaluations = json.loads((run / "ranking.json").read_text())["evaluations"]
        hashes["ranking.json"] = hashlib.sha256(json.dumps(evaluations).encode()).hexdigest()
    return hashes


def fingerprint(work: Path, only: list[str] | None = None) -> dict[str, dict[str, str]]:
    from dgpo.cli import main as dgpo_main
    from tdm_r1.cli import main as tdm_main

    def keep(name):
        return not only or name in only

    runs = {}
    for method, config in METHODS.items():
        if keep(method):
            out = work / method
            assert dgpo_main(["train", config, "--out", str(out), *_sets(DGPO_RUN)]) == 0, method
            runs[method] = tensor_hashes(out)
    if keep("tdm") or keep("surrogate") or keep("tdm_r1"):
        out = work / "tdm"
        assert tdm_main(["distill", "--out", str(out), *_sets([*TDM_RUN, "run.iterations=3",
                                                             "run.checkpoint_every=3"])]) == 0
        runs["tdm"] = tensor_hashes(out)
    if keep("surrogate"):
        out = work / "surrogate"
        assert tdm_main(["surrogate", "--out", str(out), "--updates", "2", "--eval-every", "2",
                         "--eval-prompts", "2", "--per-prompt", "4",
                         *_sets([*TDM_RUN, f"r1.init_run={work / 'tdm'}"])]) == 0
        runs["surrogate"] = tensor_hashes(out)
    if keep("tdm_r1"):
        out = work / "tdm_r1"
        assert tdm_main(["train", "--out", str(out), *_sets([*TDM_RUN, "run.iterations=2", "run.checkpoint_every=2",
                                                           f"r1.init_run={work / 'tdm'}"])]) == 0
        runs["tdm_r1"] = tensor_hashes(out)
    return runs


def compare(runs: dict, reference: dict) -> list[str]:
    """One line per run: identical, or how many tensors differ (and which run is missing)."""
    lines = []
    for name in sorted(set(runs) | set(reference)):
        a, b = runs.get(name), reference.get(name)
        if a is None or b is None:
            lines.append(f"{name}: only in {'the reference' if a is None else 'this run'}")
            continue
        differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        lines.append(f"{name}: {len(a)} tensors, " + ("bit-identical" if not differ else
                                                        f"{len(differ)} differ (first: {differ[0]})"))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write the fingerprints to (must not exist)")
    parser.add_argument("--compare", help="a fingerprint JSON to compare with; exit status 1 if any differs")
    parser.add_argument("--only", nargs="*", help=f"runs to do (default all): {[*METHODS, 'tdm', 'surrogate', 'tdm_r1']}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a new file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as work:
        runs = fingerprint(Path(work), args.only)
    out.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if args.compare:
        lines = compare(runs, json.loads(Path(args.compare).read_text()))
        print("\n".join(lines))
        return 0 if all(line.endswith("bit-identical") for line in lines) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
