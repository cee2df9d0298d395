"""Output folders never lose a user's files, and a run folder is its run's identity.

Every command with ``--out`` refuses a path that holds anything; ``--overwrite`` replaces only an earlier
output of the same command (its manifest names the files), and a folder with anything else is refused;
``--resume RUN`` reads and writes RUN itself, wherever it was moved.
"""

import json
import os
import shutil

from dgpo.cli import main
from dgpo.runtime.output_dir import MANIFEST
from test_train import TINY_RUN  # also registers the test reward

TRAIN = ["--set", "run.time_budget_min=0", "--set", "run.epochs=2", *[a for s in TINY_RUN for a in ("--set", s)]]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(capsys, command, *args) -> str:
    """Run a command that must be refused: exit status 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    assert command(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _sample(tiny_base, out, *extra):
    return main(["sample", "--model", str(tiny_base), "--split", "test", "--steps", "2", "--out", str(out), *extra])


def test_sample_refuses_a_folder_holding_a_users_files(tiny_base, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for extra in ([], ["--overwrite"]):  # not even with --overwrite: dgpo sample did not write it
        _refused(capsys, _sample, tiny_base, out, *extra)
        assert _tree(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    assert _tree(tmp_path) == ["mine", "mine/notes.txt"]  # no temporary folder left behind


def test_sample_out_resolving_to_the_working_directory_is_refused(tiny_base, tmp_path, monkeypatch, capsys):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert "not empty" in _refused(capsys, _sample, tiny_base, "sub/..")
    assert _tree(tmp_path) == ["keep.txt", "sub"]


def test_sample_overwrite_replaces_only_its_own_earlier_output(tiny_base, tmp_path, capsys):
    out = tmp_path / "samples"
    assert _sample(tiny_base, out, "--per-prompt", "2") == 0
    first = _tree(out)
    assert MANIFEST in first and "00065.png" in first
    _refused(capsys, _sample, tiny_base, out)  # taken, and no --overwrite
    assert _tree(out) == first
    assert _sample(tiny_base, out, "--overwrite") == 0  # 33 images now: the old 66 are all gone
    assert "00032.png" in _tree(out) and "00033.png" not in _tree(out)
    assert len(open(out / "samples.jsonl").readlines()) == 33
    (out / "mine.txt").write_text("x")
    assert "mine.txt" in _refused(capsys, _sample, tiny_base, out, "--overwrite")
    assert (out / "mine.txt").is_file() and (out / "00032.png").is_file()


def test_empty_existing_folder_is_used(tiny_base, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _sample(tiny_base, out) == 0
    assert (out / "grid.png").is_file()


def test_eval_out_file_is_never_a_users_file(tiny_base, tmp_path, capsys):
    samples = tmp_path / "s"
    assert _sample(tiny_base, samples) == 0
    mine = tmp_path / "result.json"
    mine.write_text("my own results")
    for extra in ([], ["--overwrite"]):
        _refused(capsys, main, ["eval", "--samples", str(samples), "--no-fd", "--out", str(mine), *extra])
        assert mine.read_text() == "my own results"
    ours = tmp_path / "ours.json"
    assert main(["eval", "--samples", str(samples), "--no-fd", "--out", str(ours)]) == 0
    assert main(["eval", "--samples", str(samples), "--no-fd", "--out", str(ours), "--overwrite"]) == 0
    assert json.loads(ours.read_text())["written_by"] == "dgpo eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.json", "result.json", "s"]


def _train(tiny_base, *args):
    return main(["train", "--set", f"model.base={tiny_base}", *TRAIN, *args])


def _checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_train_on_an_existing_run_is_refused_and_overwrite_starts_over(tiny_base, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_base, "--out", str(run), "--set", "run.checkpoint_every=1", "--set", "run.keep_checkpoints=5") == 0
    assert _checkpoints(run) == ["step-1", "step-2"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert "already exists" in _refused(capsys, _train, tiny_base, "--out", str(run), "--set", "run.epochs=1")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    # --overwrite starts over: none of the old run's later checkpoints survive to be exported or resumed
    assert _train(tiny_base, "--out", str(run), "--set", "run.epochs=1", "--overwrite") == 0
    assert _checkpoints(run) == ["step-1"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in rows) == 1
    # a folder that also holds a user's file is refused even with --overwrite
    (run / "samples" / "my-figure.png").write_bytes(b"png")
    assert "my-figure.png" in _refused(capsys, _train, tiny_base, "--out", str(run), "--overwrite")
    assert _checkpoints(run) == ["step-1"] and (run / "samples" / "my-figure.png").is_file()


def test_default_run_folder_taken_gives_the_next_free_name(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train(tiny_base) == 0
    assert _train(tiny_base) == 0
    assert "dgpo-shapes-2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["dgpo-shapes", "dgpo-shapes-2"]
    for name in ("dgpo-shapes", "dgpo-shapes-2"):
        assert _checkpoints(tmp_path / "runs" / name) == ["step-2"]


def test_resume_reads_and_writes_the_run_folder_itself(tiny_base, tmp_path, monkeypatch, capsys):
    """A run started with a relative --out, copied elsewhere, resumed from another working directory:
    the copy is continued; the original is not touched."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert _train(tiny_base, "--out", "run") == 0
    original = tmp_path / "a" / "run"
    copy = tmp_path / "b" / "moved"
    shutil.copytree(original, copy)
    before = {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()}
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "c")
    assert main(["train", "--resume", str(copy), "--set", "run.epochs=4"]) == 0
    assert _checkpoints(copy) == ["step-2", "step-4"] and _checkpoints(original) == ["step-2"]
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()} == before
    assert os.listdir(tmp_path / "c") == []
    assert "moved/final" in capsys.readouterr().out


def test_resume_refuses_to_make_the_run_another_one_but_takes_schedule_changes(tiny_base, tmp_path, capsys):
    """--resume --set may change how long and how often (budget, epochs, evaluation cadence), never what is
    trained (model, method, reward, seed …): the message names each differing key with both values."""
    run = tmp_path / "run"
    assert _train(tiny_base, "--out", str(run)) == 0
    before = _tree(run)
    err = _refused(capsys, main, ["train", "--resume", str(run), "--set", "model.lora_rank=4", "--set", "run.seed=3",
                                  "--set", "run.epochs=4"])
    assert "model.lora_rank: 2 in the run, 4 asked" in err and "run.seed: 0 in the run, 3 asked" in err
    assert "run.epochs" not in err.split("(")[1].split(")")[0]  # a schedule key is not a difference
    assert _tree(run) == before
    assert main(["train", "--resume", str(run), "--set", "run.epochs=3", "--set", "eval.every=1"]) == 0
    assert _checkpoints(run)[-1] == "step-3"


def test_resume_rejects_out_and_overwrite(tmp_path, capsys):
    assert "--resume" in _refused(capsys, main, ["train", "--resume", str(tmp_path), "--out", str(tmp_path / "x")])


def test_tdm_commands_follow_the_same_rules(tiny_base, tmp_path, capsys):
    from tdm_r1.cli import main as tdm
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    _refused(capsys, tdm, ["sample", "--model", str(tiny_base), "--split", "test", "--out", str(mine)])
    _refused(capsys, tdm, ["distill", "--set", f"teacher.base={tiny_base}", "--out", str(mine), "--overwrite"])
    assert _tree(mine) == ["notes.txt"]
    assert "--resume" in _refused(capsys, tdm, ["distill", "--resume", str(mine), "--overwrite"])


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_base, tmp_path, capsys):
    """A bad model folder fails in the recipe, after the run folder was claimed: the folder goes again (one
    the user made beforehand stays, empty, as it was); a failure after a checkpoint keeps a resumable run."""
    not_a_pipeline = tmp_path / "not-a-pipeline"
    not_a_pipeline.mkdir()
    run = tmp_path / "run"
    err = _refused(capsys, main, ["train", *TRAIN, "--set", f"model.base={not_a_pipeline}", "--out", str(run)])
    assert "model_index.json" in err and not run.exists()
    nested = tmp_path / "runs" / "sweep" / "run"  # the folders the claim made above the run go with it
    _refused(capsys, main, ["train", *TRAIN, "--set", f"model.base={not_a_pipeline}", "--out", str(nested)])
    assert not (tmp_path / "runs").exists()
    users = tmp_path / "made-by-the-user"
    users.mkdir()
    _refused(capsys, main, ["train", *TRAIN, "--set", f"model.base={not_a_pipeline}", "--out", str(users)])
    assert users.is_dir() and list(users.iterdir()) == []
    _refused(capsys, main, ["train", *TRAIN, "--set", f"model.base={not_a_pipeline}", "--out", str(users / "run")])
    assert users.is_dir() and list(users.iterdir()) == []  # the user's folder stays
    # interrupted after its first checkpoint: the run stays, and resumes
    from dgpo.trainer import Trainer
    calls = {"n": 0}
    original = Trainer.train_step

    def step_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    Trainer.train_step = step_then_interrupt
    try:
        assert main(["train", *TRAIN, "--set", f"model.base={tiny_base}", "--set", "run.checkpoint_every=1",
                     "--out", str(run)]) == 130
    finally:
        Trainer.train_step = original
    assert _checkpoints(run) == ["step-1"]
    assert main(["train", "--resume", str(run)]) == 0 and _checkpoints(run)[-1] == "step-2"


def test_ctrl_c_while_sampling_stops_cleanly_and_writes_nothing(tiny_base, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of `dgpo sample`: "interrupted", exit status 130, and no output folder (the images
    are written all at once, after the sampling)."""
    import dgpo.evaluation.evaluate as evaluation
    calls = {"n": 0}
    real = evaluation.sample_ode

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_ode", interrupted)
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tiny_base), "--split", "test", "--steps", "2", "--batch-size", "4",
                 "--out", str(out)]) == 130
    assert calls["n"] == 2 and "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
