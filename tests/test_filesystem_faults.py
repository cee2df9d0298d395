"""Filesystem faults are one line, before the work where they can be seen coming: an unwritable output folder or
cache, an empty DGPO_CACHE (unset), a disk that fills while a checkpoint is written (the previous checkpoint stays
intact and resumable); and every file of a run takes the user's umask, so a group can read a shared run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dgpo.cli import main
from dgpo.paths import cache_root
from dgpo.runtime import checkpoint as C

TINY = ["run.epochs=3", "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=2",
        "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false", "eval.every=100",
        "run.checkpoint_every=1", "model.lora_rank=2", "model.lora_alpha=2", "objective.timesteps_per_sample=1"]


def _sets(tiny_base, *extra):
    return [a for k in [f"model.base={tiny_base}", *TINY, *extra] for a in ("--set", k)]


def _one_line(capsys) -> str:
    """The command's error: one line (a progress bar may precede it on stderr), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_an_empty_dgpo_cache_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("DGPO_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "dgpo" and not (Path.cwd() / "evals").exists()


def test_an_unusable_cache_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DGPO_CACHE", str(blocker / "cache"))  # a folder under a file cannot be made
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "cache folder" in _one_line(capsys) and not (tmp_path / "run").exists()


def test_an_unwritable_cache_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    import tempfile
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path / "cache"))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    line = _one_line(capsys)
    assert "cannot be written (Permission denied)" in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train"], ["sample", "--split", "test"], ["eval", "--split", "test"]])
def test_an_unwritable_out_is_one_line_before_any_work(monkeypatch, tmp_path, capsys, command):
    """A read-only folder (seen through access(2), which also reports a read-only filesystem) for --out: the
    command stops before it loads a model, samples or evaluates."""
    import dgpo.runtime.output_dir as O
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(O.os, "access", lambda p, mode: False if Path(p) == read_only else real(p, mode))
    monkeypatch.setattr("dgpo.cli.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = read_only / ("run" if command == ["train"] else "out.json" if command[0] == "eval" else "samples")
    assert main([*command, "--out", str(out)]) == 2
    assert "cannot be written" in _one_line(capsys) and list(read_only.iterdir()) == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resumes(tiny_base, tmp_path, monkeypatch,
                                                                             capsys):
    """The disk fills while epoch 2's checkpoint is written (safetensors' own error, as it raises it): one line,
    epoch 1's checkpoint intact, no temporary folder left; with space again, --resume ends the run."""
    from safetensors import SafetensorError
    calls, real = [], C.save_file

    def fills_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(C, "save_file", fills_up)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *_sets(tiny_base)]) == 2
    line = _one_line(capsys)
    assert "No space left on device" in line and "--resume" in line
    assert [p.name for p in C.list_checkpoints(run)] == ["step-1"]
    assert C.load_latest_good(run, lambda *a: None)[0].name == "step-1"       # the checksum holds
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(C, "save_file", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "final").is_dir() and [p.name for p in C.list_checkpoints(run)][-1] == "step-3"


def test_a_runs_files_take_the_users_umask(tiny_base, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main(["train", "--out", str(tmp_path / "run"), *_sets(tiny_base)]) == 0
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*")}
    assert {m for p, m in modes.items() if p.is_dir() or (tmp_path / p).is_dir()} == {0o750}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o640}, modes
    assert any(str(p).endswith(".safetensors") for p in modes)


def test_save_tensors_turns_the_serialisers_io_error_into_an_oserror(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def quota(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 122, kind: FilesystemQuotaExceeded })")
    monkeypatch.setattr(C, "save_file", quota)
    with pytest.raises(OSError) as e:
        C.save_tensors({"w": torch.zeros(1)}, tmp_path / "t.safetensors")
    assert e.value.errno == 122 and e.value.filename == str(tmp_path / "t.safetensors")


def test_too_little_disk_for_a_checkpoint_is_one_line_before_any_work(tiny_base, tmp_path, monkeypatch, capsys):
    """The run folder's filesystem is checked for room for its checkpoints before the first evaluation and step:
    one line naming what is free and what is needed; the new run's folder goes."""
    from collections import namedtuple
    import dgpo.runtime.loop as L
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(L.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (5 << 20), 5 << 20))
    monkeypatch.setattr(L.Run, "_evaluated", lambda self, row: pytest.fail("evaluated before the check"))
    assert main(["train", "--out", str(tmp_path / "run"), *_sets(tiny_base)]) == 2
    line = _one_line(capsys)
    assert "has 5 MiB free" in line and "MiB" in line.split("need")[-1] and not (tmp_path / "run").exists()
