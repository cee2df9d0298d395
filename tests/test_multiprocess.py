"""Training on two processes (accelerate launch, gloo on CPU) takes the step one process takes on the same global
batch — for DGPO (groups spread over both processes, group sums all-reduced inside the loss), Flow-GRPO (SDE
rollouts, per-sample loss, random parts), TDM (self-normalised importance weights over the global batch) and
TDM-R1 (the surrogate's groups spread over both processes, rewards gathered for the advantages), and the
surrogate trained alone — and a 2-process run resumed from its checkpoint ends exactly where the uninterrupted
one does.

The reward is continuous (mean brightness, a plug-in file), so float differences between batch sizes cannot
flip a 0/1 reward. Each run is its own process tree, as a user launches it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_margin
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REWARD_PLUGIN = '''
from dgpo.rewards import register_reward

class Brightness:
    """Mean pixel value in [0, 1]: dense, so every group has a preference."""
    name = "brightness"
    def __call__(self, images, prompts):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0

register_reward("brightness", Brightness, overwrite=True)
'''

TINY_TRAIN = ["run.epochs=2", "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=3",
              "rollout.steps=2", "rollout.guidance_scale=2.0", "eval.per_prompt=1", "eval.sampler.steps=2",
              "eval.fd=false", "eval.every=100", "eval.cache_initial=false", "run.checkpoint_every=1",
              "optim.micro_batch=2", "model.lora_rank=2", "model.lora_alpha=2", "optim.lr=1e-2",
              "reward.name=brightness", "objective.timesteps_per_sample=2", "run.threads=1"]
TINY_R1 = ["run.iterations=2", "run.time_budget_min=0", "optim.batch_size=8", "r1.group_size=4", "eval.per_prompt=1",
           "eval.fd=false", "eval.every=1000", "run.checkpoint_every=1", "student.lora_rank=2", "student.lora_alpha=2",
           "fake.lora_rank=2", "fake.lora_alpha=2", "surrogate.lora_rank=2", "surrogate.lora_alpha=2",
           "surrogate.lr=1e-2", "r1.init_run=", "reward.name=brightness", "run.threads=1"]
TINY_DISTILL = ["run.iterations=2", "run.time_budget_min=0", "optim.batch_size=8", "eval.per_prompt=1",
                "eval.fd=false", "eval.every=1000", "run.checkpoint_every=1", "student.lora_rank=2",
                "student.lora_alpha=2", "fake.lora_rank=2", "fake.lora_alpha=2", "run.threads=1"]


ACCELERATE_CPU = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2_processes.yaml"
ACCELERATE_CPU_FSDP = ACCELERATE_CPU.with_name("cpu_2_processes_fsdp.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, cwd: Path, launch: Path = ACCELERATE_CPU) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", *args]
    else:  # on a machine without GPUs, --multi_gpu launches CPU processes over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--num_processes", str(processes), "--main_process_port", str(_free_port()), "-m", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert ("processes)" in done.stdout) == (processes > 1), done.stdout[-2000:]
    assert processes == 1 or f"({processes} processes)" in done.stdout, done.stdout[-2000:]  # really N processes
    return done


def _sets(keys):
    return [a for k in keys for a in ("--set", k)]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "brightness_reward.py"
    path.write_text(REWARD_PLUGIN)
    return path


# Plain SGD for the 1-vs-N comparisons of a training step: Adam divides each gradient coordinate by its own
# magnitude, so a coordinate whose gradient is ~1e-9 moves by ±lr either way, and the rounding of a sum over
# two processes (instead of one) flips it: 1.5e-3 apart on one CPU, within 3e-5 on another. SGD's step is
# linear in the gradient, which is what N processes must agree on.
SGD_STEP = ["optim.name=sgd", "optim.momentum=0", "optim.lr=1"]


def _train(tiny_base, out: Path, processes: int, plugin: Path, *extra) -> None:
    repo = Path(__file__).resolve().parents[1]
    _run(["dgpo.cli", "train", "configs/dgpo/shapes.yaml", "--out", str(out), "--plugin", str(plugin),
          *_sets([f"model.base={tiny_base}", *TINY_TRAIN, *extra])], processes, repo)  # _run checks the count


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    """Every tensor of ``a`` within ``atol`` of ``b``'s; the margin logged is atol / the largest difference."""
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    assert_margin(atol, max(worst, 1e-12), f"{what}: tolerance / max |1 vs N processes|", worst=worst, scale=scale)


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dgpo", "flow_grpo"])
def test_two_processes_train_like_one(method, tiny_base, plugin, tmp_path, outcome_seed):
    """One SGD step per epoch, two epochs: the LoRA on 2 processes ends within 1% of its move (+1e-5) of where 1
    process puts it. Measured (seeds 0-2, each process on 1 thread): the move, max |lora_B|, clears its 1e-3
    guard 59-102× (DGPO) and 3.7-6.2× (Flow-GRPO); the tolerance clears the largest difference 3.5-8150× (DGPO:
    1.3e-7-1.7e-4, grown from rounding through the second epoch's rollouts and group-normalised rewards) and
    11-6000× (Flow-GRPO). A broken reduction (a sum, or half the batch) moves it by ~100%."""
    extra = [f"objective.name={method}", f"run.seed={outcome_seed}", *SGD_STEP] + (
        ["rollout.solver=euler", "rollout.policy=current"] if method == "flow_grpo" else [])
    _train(tiny_base, tmp_path / "one", 1, plugin, *extra)
    _train(tiny_base, tmp_path / "two", 2, plugin, *extra)
    one, two = (_tensors(tmp_path / r / "final" / "lora" / "pytorch_lora_weights.safetensors") for r in ("one", "two"))
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)
    assert_margin(moved, 1e-3, f"{method}: max |lora_B| (the comparison is not empty) vs 1e-3")
    _assert_close(one, two, atol=1e-5 + 1e-2 * moved, what=method)
    print(f"{method}: LoRA moved up to {moved:.3g}; 1 vs 2 processes differ by at most "
          f"{max((one[k] - two[k]).abs().max().item() for k in one):.3g}")
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r.get("reward") for r in r1] == pytest.approx([r.get("reward") for r in r2], abs=1e-4)
    assert r1[-1]["nfe"] == r2[-1]["nfe"]  # transformer calls summed over both processes
    # evaluation sharded by image and gathered: the same images, so the same score
    evals1, evals2 = [r for r in r1 if "eval_geneval" in r], [r for r in r2 if "eval_geneval" in r]
    assert [r["eval_geneval"] for r in evals1] == [r["eval_geneval"] for r in evals2]
    # only the main process wrote: one set of checkpoints, one final folder, no second run folder
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (tmp_path / "two-2").exists()


def test_two_process_run_resumes_exactly(tiny_base, plugin, tmp_path):
    _train(tiny_base, tmp_path / "whole", 2, plugin)
    _train(tiny_base, tmp_path / "pieces", 2, plugin, "run.epochs=1")
    repo = Path(__file__).resolve().parents[1]
    _run(["dgpo.cli", "train", "--resume", str(tmp_path / "pieces"), "--set", "run.epochs=2"], 2, repo)
    whole, pieces = (_tensors(tmp_path / r / "checkpoints" / "step-2" / "tensors.safetensors")
                     for r in ("whole", "pieces"))
    for key in whole:
        assert torch.equal(whole[key], pieces[key]), key


def test_tdm_two_processes_distil_like_one(tiny_base, tmp_path, outcome_seed):
    """Measured margin of the adapters' move (max |lora_B| of the student and the fake score vs 1e-4; seeds
    0-2, each process on 1 thread): 27-32x."""
    repo = Path(__file__).resolve().parents[1]
    for name, n in (("one", 1), ("two", 2)):
        _run(["tdm_r1.cli", "distill", "configs/tdm/shapes.yaml", "--out", str(tmp_path / name),
              *_sets([f"teacher.base={tiny_base}", *TINY_DISTILL, f"run.seed={outcome_seed}"])], n, repo)
    one, two = (_tensors(tmp_path / r / "checkpoints" / "step-2" / "tensors.safetensors") for r in ("one", "two"))
    trained = {k: v for k, v in one.items() if k.startswith(("student.", "fake."))}
    moved = max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k)
    assert_margin(moved, 1e-4, "tdm: max |lora_B| (the comparison is not empty) vs 1e-4")
    _assert_close(trained, {k: two[k] for k in trained}, atol=1e-5 + 1e-3 * moved, what="tdm")
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    train1, train2 = [r for r in r1 if "loss_fake" in r], [r for r in r2 if "loss_fake" in r]
    assert [r["loss_fake"] for r in train1] == pytest.approx([r["loss_fake"] for r in train2], rel=1e-3)
    assert [r["ess"] for r in train1] == pytest.approx([r["ess"] for r in train2], rel=1e-3)


@pytest.mark.parametrize("k_weight", ["group", "sample"])
def test_tdm_r1_two_processes_train_like_one(k_weight, tiny_base, plugin, tmp_path, outcome_seed):
    """Groups of 4 over 2 processes (rows strided: each group has two samples on each process): the student, the
    fake score and the surrogate end where one process puts them, and the logged rewards are the global batch's.
    Measured margin of each role's move (max |lora_B|; seeds 0-2, each process on 1 thread): fake 28-34x and
    surrogate 200x their 1e-4, student 4.8x its 5e-5 — Adam with β₁ = 0 moves a weight by at most
    (1 + √1.99)·lr in two steps, and optim.generator_lr is 1e-4, so the student moves 2.4e-4 at every seed
    (with lr 1e-3 seed 1's one-vs-two-process comparison fails by 0.014). The tolerance clears the largest
    1-vs-2-process difference 13-30000×; it is set by the surrogate's move (2e-3), larger than the student's
    whole move, so the student's part of the comparison is loose (left as it is)."""
    repo = Path(__file__).resolve().parents[1]
    for name, n in (("one", 1), ("two", 2)):
        _run(["tdm_r1.cli", "train", "configs/tdm_r1/shapes.yaml", "--out", str(tmp_path / name), "--plugin",
              str(plugin), *_sets([f"teacher.base={tiny_base}", *TINY_R1, f"surrogate.k_weight={k_weight}",
                                   f"run.seed={outcome_seed}"])], n, repo)
    one, two = (_tensors(tmp_path / r / "checkpoints" / "step-2" / "tensors.safetensors") for r in ("one", "two"))
    trained = {k: v for k, v in one.items() if k.startswith(("student.", "fake.", "surrogate."))}
    # Adam with β₁ = 0 moves a weight by about its lr a step, so the student (lr 1e-4) moves by at most 2.4e-4 in
    # two steps whatever the seed: its guard is half its lr
    for role, least in (("student.", 5e-5), ("fake.", 1e-4), ("surrogate.", 1e-4)):
        moved = max(v.abs().max().item() for k, v in trained.items() if k.startswith(role) and "lora_B" in k)
        assert_margin(moved, least, f"{role[:-1]}: max |lora_B| (the comparison is not empty) vs {least:g}")
    _assert_close(trained, {k: two[k] for k in trained}, atol=1e-5 + 1e-3 * max(v.abs().max().item()
                                                                                for v in trained.values()),
                  what=f"tdm_r1 {k_weight}")
    rows1, rows2 = ([r for r in _rows(tmp_path / n) if "loss_surrogate" in r] for n in ("one", "two"))
    assert len(rows1) == len(rows2) == 2
    for key in ("reward", "reward_std", "loss_surrogate", "surrogate_margin", "reward_gap", "loss_gen"):
        # the rows are rounded to 6 decimals: values a hair apart can round one unit (1e-6) apart
        assert [r[key] for r in rows1] == pytest.approx([r[key] for r in rows2], rel=1e-3, abs=2.5e-6), key


def test_surrogate_alone_on_two_processes_like_one(tiny_base, plugin, tmp_path):
    """`tdm-r1 surrogate` on two processes: the same surrogate and the same ranking table as on one."""
    repo = Path(__file__).resolve().parents[1]
    for name, n in (("one", 1), ("two", 2)):
        _run(["tdm_r1.cli", "surrogate", "configs/tdm_r1/shapes.yaml", "--out", str(tmp_path / name), "--plugin",
              str(plugin), "--updates", "2", "--eval-every", "2", "--eval-prompts", "2", "--per-prompt", "4",
              *_sets([f"teacher.base={tiny_base}", *TINY_R1])], n, repo)
    one, two = (_tensors(tmp_path / r / "surrogate_lora" / "pytorch_lora_weights.safetensors") for r in ("one", "two"))
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-4
    _assert_close(one, two, atol=1e-5 + 1e-3 * moved, what="surrogate")
    rank1, rank2 = (json.loads((tmp_path / r / "ranking.json").read_text())["evaluations"] for r in ("one", "two"))
    assert [row["mean"] for row in rank1] == pytest.approx([row["mean"] for row in rank2], abs=1e-6)
    listing = [sorted(p.name for p in (tmp_path / r).iterdir()) for r in ("one", "two")]
    assert listing[0] == listing[1] and "surrogate_lora" in listing[1]  # one writer, nothing else
