"""The frozen model sharded over 2 or 3 processes (FSDP2, configs/accelerate/cpu_2_processes_fsdp.yaml) trains as
the same processes holding it whole, for every recipe, including processes with unequal shares of a micro-batch
loop; and what a sharded launch cannot honour is refused in one line. The launch helpers, the tiny settings and
the reward plug-in are tests/test_multiprocess.py's (a file of its own so the two spread over pytest's workers).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_multiprocess import (ACCELERATE_CPU_FSDP, TINY_DISTILL, TINY_R1, TINY_TRAIN, _free_port, _rows, _run,
                               _sets, _tensors, plugin)  # noqa: F401  (plugin: a fixture)

pytestmark = pytest.mark.slow


SHARDED = {  # recipe, processes, settings; the last three give processes unequal shares of a micro-batch loop
    "dgpo": ("dgpo", 2, []),
    "dgpo-bf16-weights": ("dgpo", 2, ["model.mixed_precision=bf16", "model.weights_dtype=bf16"]),
    "tdm": ("tdm", 2, []),
    "tdm_r1": ("tdm_r1", 2, []),
    "tdm_r1-default": ("tdm_r1", 2, []),
    "flow_grpo-random-parts": ("flow_grpo", 2, ["flow_grpo.updates_per_epoch=3", "optim.micro_batch=1"]),
    "dgpo-part-without-rows": ("dgpo", 3, ["rollout.prompts_per_epoch=3", "rollout.group_size=2",
                                           "optim.micro_batch=1"]),
    "nft-uneven-groups": ("nft", 3, ["rollout.prompts_per_epoch=3", "rollout.group_size=4", "optim.micro_batch=2"]),
}


@pytest.mark.parametrize("case", sorted(SHARDED))
def test_sharded_processes_train_like_one(case, tiny_base, plugin, tmp_path):
    """configs/accelerate/cpu_2_processes_fsdp.yaml (2 or 3 processes): each process holds 1/N of the frozen
    model (backbone and the text encoders' layers, FSDP2) and gathers a block's weights for each call; the adapters train to
    where the same processes holding the whole model put them (the tests above compare those with one process),
    and the evaluation (an odd number of images: one process makes one more) is the same. The last three cases give the processes unequal shares of a method's micro-batch loop
    (Flow-GRPO's random parts, a DGPO part with no row of one process, DiffusionNFT's per-process groups): a
    process with fewer makes the rest on a stand-in row; without it the run would hang in a gather."""
    recipe, processes, settings = SHARDED[case]
    repo = Path(__file__).resolve().parents[1]
    if recipe in ("dgpo", "flow_grpo", "nft"):
        extra = ["rollout.solver=euler", "rollout.policy=current"] if recipe == "flow_grpo" else []
        args = ["dgpo.cli", "train", "configs/dgpo/shapes.yaml", "--plugin", str(plugin),
                *_sets([f"model.base={tiny_base}", *TINY_TRAIN, f"objective.name={recipe}", *extra, *settings])]
    elif recipe == "tdm":
        args = ["tdm_r1.cli", "distill", "configs/tdm/shapes.yaml", *_sets([f"teacher.base={tiny_base}", *TINY_DISTILL])]
    else:  # the measured recipe bit for bit; the default (τ in (σ_{k+1}, 1], its fake score conditioned on the step)
        # agrees to float rounding only: its adapters differ by 6e-6 after 2 iterations, 3e-4 of how far they moved
        recipe_file = "configs/tdm_r1/shapes.yaml" if case == "tdm_r1-default" else "configs/tdm_r1/shapes_scheduler_levels.yaml"
        args = ["tdm_r1.cli", "train", recipe_file, "--plugin", str(plugin), *_sets([f"teacher.base={tiny_base}", *TINY_R1])]
    _run([*args, "--out", str(tmp_path / "whole")], processes, repo)  # every process holds the whole model
    done = _run([*args, "--out", str(tmp_path / "sharded")], processes, repo, launch=ACCELERATE_CPU_FSDP)
    said = re.search(rf"sharded over {processes} processes \(FSDP2\): each holds about ([\d.,]+) M of the ([\d.,]+) M "
                     r"frozen parameters \(([\d.,]+) M", done.stdout)
    assert said, done.stdout[-2000:]
    held, total, whole = (float(said.group(i).replace(",", "")) for i in (1, 2, 3))
    assert total > 0.1 and whole < total / 2, (total, whole)
    assert abs(held - (whole + (total - whole) / processes)) <= 0.002 + 0.02 * total, (held, total, whole)
    whole, sharded = (_tensors(tmp_path / r / "checkpoints" / "step-2" / "tensors.safetensors")
                      for r in ("whole", "sharded"))
    trained = {k: v for k, v in whole.items() if "lora_" in k}
    moved = max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k)
    assert moved > 1e-4, "the adapters did not move: the comparison would be empty"
    rows = [_rows(tmp_path / n) for n in ("whole", "sharded")]
    if case == "tdm_r1-default":
        worst = max((trained[k] - sharded[k]).abs().max().item() for k in trained)
        assert worst < 1e-2 * moved, (worst, moved)  # a missed reduction or a wrong shard moves them by ~moved
    else:
        differ = [k for k in trained if not torch.equal(trained[k], sharded[k])]  # gathers are exact, stand-ins add 0
        assert not differ, f"{len(differ)} adapter weights differ, e.g. {differ[0]}"
        evals = [[r["eval_geneval"] for r in run if "eval_geneval" in r] for run in rows]
        assert evals[0] and evals[0] == evals[1]
    nfe = [[r["nfe"] for r in run if "nfe" in r] for run in rows]
    assert nfe[0] == nfe[1], nfe  # a stand-in's calls are not counted
    print(f"{case}: adapters moved up to {moved:.3g}; sharded and whole bitwise equal; NFE {nfe[0][-1]}")


@pytest.mark.parametrize("tool, setting, says", [
    ("dgpo", "model.mixed_precision=fp16", "model.mixed_precision=fp16 under an FSDP launch"),
    ("tdm", "student.mode=full", "student.mode=full under an FSDP launch")])
def test_a_sharded_launch_refuses_what_it_cannot_shard_in_one_line(tool, setting, says, tiny_base, plugin, tmp_path):
    """fp16 (accelerate would unscale the gradients twice) and a fully trained student: one line, a failed exit
    and no run folder left behind."""
    repo = Path(__file__).resolve().parents[1]
    args = (["dgpo.cli", "train", "configs/dgpo/shapes.yaml", "--plugin", str(plugin),
             *_sets([f"model.base={tiny_base}", *TINY_TRAIN])] if tool == "dgpo" else
            ["tdm_r1.cli", "distill", "configs/tdm/shapes.yaml", *_sets([f"teacher.base={tiny_base}", *TINY_DISTILL])])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU_FSDP),
           "--main_process_port", str(_free_port()), "-m", *args, "--out", str(tmp_path / "run"), "--set", setting]
    done = subprocess.run(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert says in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert "UserError" not in done.stdout + done.stderr  # said as one line, not raised through (accelerate's
    assert not (tmp_path / "run").exists()              # launcher still prints its own trace of a failed child)
