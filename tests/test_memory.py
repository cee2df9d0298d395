"""Peak memory: logged every step, a limit that stops a run with one clear line, and an out-of-memory error
turned into the same kind of message."""

import json
import sys

import pytest
import torch

from conftest import load_script
from dgpo.cli import main
from dgpo.errors import UserError
from dgpo.trainer import Trainer, prepare_run_dir
from test_train import TINY_RUN, tiny_cfg


def test_every_step_logs_its_peak_memory(tiny_base, tmp_path):
    """Each step logs this process's peak memory so far: on CPU its peak resident set, so between the peak
    before the run and the peak after it (a band that the machine's speed, load or earlier tests in the
    process do not move; 0.66-0.74 GB measured here). On CUDA: allocated GPU memory, positive."""
    from dgpo.runtime.loop import peak_memory_gb
    out = tmp_path / "run"
    before = peak_memory_gb()
    Trainer(prepare_run_dir(tiny_cfg(tiny_base, out, "run.epochs=2"), False), log=lambda *a: None).run()
    after = peak_memory_gb()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in l]
    peaks = [r["peak_memory_gb"] for r in rows]
    assert len(rows) == 2 and all(0 < p < 64 for p in peaks), peaks
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):  # the resident set: also > 0.1 GB
        assert all(max(before, 0.1) - 1e-3 <= p <= after + 1e-3 for p in peaks), (before, peaks, after)
        assert peaks == sorted(peaks), peaks  # a peak so far never falls


def test_a_memory_limit_stops_the_run_with_one_line_and_leaves_no_folder(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *sum((["--set", o] for o in [
        f"model.base={tiny_base}", "run.epochs=3", "run.time_budget_min=0", *TINY_RUN, "run.max_memory_gb=0.01"]),
        [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "passed run.max_memory_gb=0.01 at the start (the model loaded): lower optim.micro_batch" in err
    assert "nothing was checkpointed yet" in err
    assert not out.exists()  # nothing was checkpointed: the run folder goes


def test_a_memory_limit_after_a_checkpoint_keeps_the_run_resumable(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    sets = lambda *kv: sum((["--set", o] for o in kv), [])  # noqa: E731
    assert main(["train", "--out", str(out), *sets(f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0",
                                                   *TINY_RUN)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *sets("run.epochs=4", "run.max_memory_gb=0.01")]) == 2
    err = capsys.readouterr().err  # checked as soon as the model is loaded, before minutes of evaluation
    assert "passed run.max_memory_gb=0.01 at the start" in err and "the last checkpoint is intact" in err
    assert main(["train", "--resume", str(out), *sets("run.epochs=4", "run.max_memory_gb=0")]) == 0


def test_out_of_gpu_memory_is_one_line_naming_the_levers(tiny_base, tmp_path, monkeypatch):
    trainer = Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "run", "run.epochs=2"), False),
                      log=lambda *a: None)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(UserError, match="out of GPU memory at epoch 1: lower optim.micro_batch .* or set "
                                        "model.gradient_checkpointing=true; nothing was checkpointed yet"):
        trainer.run()


def test_the_profile_reads_a_child_process_peak(tmp_path):
    profile = load_script("scripts/memory_profile.py")
    small, rc, _ = profile.peak_rss_of([sys.executable, "-c", "pass"], tmp_path / "a.log")
    big, rc2, _ = profile.peak_rss_of([sys.executable, "-c", "b = bytearray(600 * 2**20); b[::4096] = b'x' * "
                                       "len(b[::4096])"], tmp_path / "b.log")
    assert rc == rc2 == 0 and small < 0.2 and 0.55 < big - small < 0.75


def test_out_of_gpu_memory_in_an_evaluation_is_one_line(tiny_base, tmp_path, monkeypatch):
    trainer = Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "run", "run.epochs=2", "eval.cache_initial=false"),
                                      False), log=lambda *a: None)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(trainer, "evaluate", oom)
    with pytest.raises(UserError, match="out of GPU memory in the evaluation after epoch 0: lower optim.micro_batch"):
        trainer.run()
