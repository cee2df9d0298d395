"""What does a user see for bad input? Runs each bad input below through the real command line and records the
exit status and the message, as a markdown table (``docs/bad-input.md`` holds the last one) and JSON.

    python scripts/diagnostics/bad_inputs.py --out OUT      # about a minute on a CPU

Each case runs in a fresh temporary folder as its working directory, with an empty ``DGPO_CACHE``, as a process
of its own that does what the console script does (:func:`dgpo.runtime.forked_commands.run_command`: forked from a
server that imported the commands once, so the cases do not each pay the interpreter's start); a case passes
when the command exits with status 2, prints one line, and leaves the folder as it found it (apart from the
files the case itself prepared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dgpo.runtime.forked_commands import run_command

ROOT = Path(__file__).resolve().parents[2]
TOOL = "bad_inputs"

TINY = ["--set", "run.epochs=1", "--set", "run.time_budget_min=0"]
#: The shipped base: cases copy it (whole, or but some components) to damage the copy.
SHIPPED = ROOT / "dgpo" / "worlds" / "shapes_base" / "shipped" / "shapes_grammar_fidelity0.5"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def lora_file(shapes: dict[str, tuple[int, int]]) -> bytes:
    """A diffusers LoRA file (safetensors bytes) with zero tensors of these names and shapes."""
    import torch
    from safetensors.torch import save
    return save({name: torch.zeros(shape) for name, shape in shapes.items()})


def lora_cases() -> list:
    q = "transformer.transformer_blocks.0.attn.to_q"
    return [
        ("garbage safetensors as a LoRA", {"lora/pytorch_lora_weights.safetensors": os.urandom(4096)},
         ["dgpo", "eval", "--lora", "lora", "--per-prompt", "1"]),
        ("a LoRA of another architecture (shapes differ)",
         {"lora/pytorch_lora_weights.safetensors": lora_file({f"{q}.lora_A.weight": (4, 999),
                                                               f"{q}.lora_B.weight": (999, 4)})},
         ["dgpo", "eval", "--lora", "lora", "--per-prompt", "1"]),
        ("a LoRA whose keys match nothing (a UNet's)",
         {"lora/pytorch_lora_weights.safetensors": lora_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": (4, 8),
                                                               "unet.down_blocks.0.attn1.to_q.lora_B.weight": (8, 4)})},
         ["dgpo", "eval", "--lora", "lora", "--per-prompt", "1"]),
    ]


# (what, files to prepare {name: bytes, or (folder to copy, [names left out])}, command arguments)
CASES = [
    ("malformed YAML config", {"bad.yaml": b"run: [unclosed\n"}, ["dgpo", "train", "bad.yaml"]),
    ("unknown config key", {}, ["dgpo", "train", "--set", "optim.learning_rate=1e-4"]),
    ("wrong type", {}, ["dgpo", "train", "--set", "rollout.group_size=eight"]),
    ("zero size", {}, ["dgpo", "train", "--set", "rollout.group_size=0"]),
    ("negative size", {}, ["dgpo", "train", "--set", "optim.micro_batch=-4"]),
    ("non-finite number", {}, ["dgpo", "train", "--set", "optim.lr=nan"]),
    ("a config path that is a directory", {"configs_dir/x": b""}, ["dgpo", "train", "configs_dir"]),
    ("unknown reward", {}, ["dgpo", "train", "--set", "reward.name=image_reward"]),
    ("a model-based reward without its model", {}, ["dgpo", "train", "--set", "reward.name=clip_score"]),
    ("remote reward without a URL", {}, ["dgpo", "train", "--set", "reward.name=remote"]),
    ("empty prompt file", {"p.txt": b""}, ["dgpo", "sample", "--prompts", "p.txt", "--out", "s"]),
    ("non-UTF-8 prompt file", {"p.txt": "caf\xe9\n".encode("latin-1")}, ["dgpo", "sample", "--prompts", "p.txt", "--out", "s"]),
    ("prompt outside the world's grammar (dgpo eval)", {"p.txt": b"a photo of a dragon\n"},
     ["dgpo", "eval", "--prompts", "p.txt"]),
    ("model folder that is empty", {"model/.keep": b""}, ["dgpo", "sample", "--model", "model", "--split", "test", "--out", "s"]),
    ("model folder that is not a pipeline", {"model/model_index.json": b"{not json"},
     ["dgpo", "sample", "--model", "model", "--split", "test", "--out", "s"]),
    ("LoRA folder without weights", {"lora/README.md": b"x"}, ["dgpo", "eval", "--lora", "lora", "--per-prompt", "1"]),
    ("--resume of a missing run", {}, ["dgpo", "train", "--resume", "no-such-run"]),
    ("--out holding a user's file", {"out/notes.txt": b"mine"}, ["dgpo", "sample", "--split", "test", "--out", "out"]),
    ("prompt file world with a bad line", {"w.jsonl": b'{"prompt": "x", "split": "validation"}\n'},
     ["dgpo", "train", "--set", "world=w.jsonl", "--set", "model.base=nowhere"]),
    ("serve-reward on a public address without a token", {}, ["dgpo", "serve-reward", "shapes_partial", "--host", "0.0.0.0"]),
    ("serve-reward of an unknown reward", {}, ["dgpo", "serve-reward", "no_such_reward"]),
    ("model folder with half a pipeline (no transformer/)", {"model": (SHIPPED, ["transformer"])},
     ["dgpo", "sample", "--model", "model", "--split", "test", "--out", "s"]),
    ("model folder with truncated weights", {"model": (SHIPPED, []),
                                             f"model/{WEIGHTS}": (SHIPPED / WEIGHTS).read_bytes()[:100_000]},
     ["dgpo", "sample", "--model", "model", "--split", "test", "--out", "s"]),
    ("prompt longer than the tokenizer reads", {"p.txt": b"a photo of a red circle " * 20 + b"\n"},
     ["dgpo", "sample", "--prompts", "p.txt", "--out", "s"]),
    ("zero-size flag", {}, ["dgpo", "sample", "--split", "test", "--per-prompt", "0", "--out", "s"]),
    ("non-finite flag", {}, ["dgpo", "sample", "--split", "test", "--cfg", "nan", "--out", "s"]),
    ("negative seed", {}, ["tdm-r1", "sample", "--lora", "lora", "--seed", "-1", "--split", "test", "--out", "s"]),
    *lora_cases(),
    # the benchmark scripts' reports: a file of a report's name that the script did not write
    ("benchmark --out holding a user's file named like its report", {"out/bench_rl.md": b"mine"},
     ["scripts/bench_rl.py", "--out", "out", "--report-only"]),
    ("--overwrite beside a user's file named like the report, no report of the script's own",
     {"out/memory_profile.md": b"mine"}, ["scripts/memory_profile.py", "--out-dir", "out", "--overwrite"]),
    # a shared cluster's faults (the lock on a live run and preemption are tested with live processes:
    # tests/test_writer_lock.py, tests/test_preemption.py, tests/test_chaos.py)
    ("a config section given twice", {"twice.yaml": b"run:\n  seed: 3\nmodel:\n  lora_rank: 4\nrun:\n  epochs: 2\n"},
     ["dgpo", "train", "twice.yaml"]),
    ("Adam's betas: one number", {}, ["dgpo", "train", "--set", "optim.betas=[0.9]"]),
    ("Adam's betas: above 1", {}, ["tdm-r1", "distill", "--set", "optim.betas=[1.5,2]"]),
    ("reward weights that do not fit the rewards", {}, ["dgpo", "train", "--set", "reward.weights=[1,2,3]"]),
    ("a cache folder that cannot be made (DGPO_CACHE under a file)", {"a_file": b""}, ["dgpo", "train"],
     {"DGPO_CACHE": "a_file/cache"}),
    ("--resume and --resume-or-start together", {}, ["dgpo", "train", "--resume", "r", "--resume-or-start", "r"]),
    ("a samples folder that lists a file outside it", {"s/samples.jsonl": b'{"file": "../../etc/passwd", "prompt": "x"}\n'},
     ["dgpo", "eval", "--samples", "s"]),
    ("a samples folder whose .png is not an image", {"s/samples.jsonl": b'{"file": "0.png", "prompt": "x"}\n',
                                                     "s/0.png": b"not a png"}, ["dgpo", "eval", "--samples", "s"]),
    ("a prompt of 480,000 characters (the message quotes 60)", {"p.txt": b"a photo of a cat " * 28_000 + b"\n"},
     ["dgpo", "eval", "--prompts", "p.txt"]),
    ("a LoRA without its sampler.json given to tdm-r1 sample (a DGPO LoRA)",
     {"lora/pytorch_lora_weights.safetensors": lora_file({"transformer_blocks.0.attn.to_q": (2, 32)})},
     ["tdm-r1", "sample", "--lora", "lora", "--split", "test", "--out", "s"]),
]


MAX_MESSAGE = 600  # characters: a message quotes what it must, not a whole prompt or file


def run_case(what: str, files: dict, argv: list[str], env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
        folder = Path(tmp)
        for name, data in sorted(files.items(), key=lambda kv: isinstance(kv[1], bytes)):  # copies first
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                (folder / name).write_bytes(data)
            else:
                source, left_out = data
                shutil.copytree(source, folder / name, ignore=lambda d, names: [n for n in names if n in left_out])
        before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        command = [str(ROOT / argv[0]) if argv[0].endswith(".py") else argv[0], *argv[1:]]  # a script, or a command
        status, _, stderr = run_command(command, folder, {**os.environ, "DGPO_CACHE": cache, **(env or {})}, timeout=90)
        if status is None:  # the command accepted the input and started working
            stderr = "(accepted: the command was still working after 90 s)"
        after = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    lines = [l for l in stderr.splitlines() if l.strip() and "%|" not in l]
    return {"input": what, "command": " ".join(argv), "status": status, "message": lines[-1] if lines else "",
            "lines": len(lines), "left_alone": before == after,
            "ok": status == 2 and len(lines) == 1 and before == after and len(lines[0]) <= MAX_MESSAGE}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for bad_inputs.json and bad_inputs.md")
    p.add_argument("--overwrite", action="store_true", help="replace bad_inputs.* written by an earlier run")
    args = p.parse_args(argv)
    from dgpo.errors import UserError
    from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json
    report = report_files(args.out, "bad_inputs", (".json", ".md"))
    try:  # before the work: a report it may not write is refused first
        check_report_outputs(report[0], report[1:], TOOL, args.overwrite, "--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for what, files, command, *env in CASES:
        rows.append(run_case(what, files, command, *env))
        print(f"{'ok ' if rows[-1]['ok'] else 'BAD'} {what}: {rows[-1]['message'][:120]}", flush=True)
    try:  # checked again: the folder may have changed during the work
        write_report_json(report, {"cases": rows}, TOOL, args.overwrite, "--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = ["| input | command | exit | message |", "|---|---|---|---|"]
    for r in rows:
        message = r["message"].replace("|", "\\|")
        flag = "" if r["ok"] else " **(not yet one line / status 2 / untouched)**"
        table.append(f"| {r['input']} | `{r['command']}` | {r['status']} | {message}{flag} |")
    report[1].write_text("\n".join(table) + "\n")
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases give one line, exit status 2 and touch nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
