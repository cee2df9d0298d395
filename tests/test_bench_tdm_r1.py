"""scripts/bench_tdm_r1.py end to end on a tiny base: every row trains from the one shared student, every model
is evaluated on the same seed sets, gains are paired, and a second call reads what the first one made."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import load_script

from tdm_r1.cli import main as tdm_main


@pytest.mark.slow
def test_bench_tdm_r1_rows_share_one_student_and_a_rerun_reads_them(tiny_base, tmp_path, capsys):
    student = tmp_path / "tdm"
    sets = [f"teacher.base={tiny_base}", "run.iterations=2", "run.time_budget_min=0", "optim.batch_size=4",
            "eval.per_prompt=1", "eval.fd=false"]
    assert tdm_main(["distill", "--out", str(student), *[a for s in sets for a in ("--set", s)]]) == 0
    r1, rl = ["optim.batch_size=4", "r1.group_size=2"], ["rollout.prompts_per_epoch=2", "rollout.group_size=2"]
    tiny = {"r1": r1, "r1_released": r1, "r1_heldout": r1, "dm_dgpo_student": r1, "dgpo_student": rl, "dgpo_student_full": rl,
            "dgpo_student_full_kl": rl, "flow_grpo_student": rl, "dgpo_teacher": [*rl, "rollout.steps=2"]}
    out = tmp_path / "out"
    args = ["--student", str(student), "--out", str(out), "--minutes", "0.03", "--per-prompt", "1",
            "--final-per-prompt", "2", "--seed-sets", "2", "--speed-repeats", "1", "--speed-batch", "2",
            "--heldout", "color_attr,position", "--threads", "1",
            *[a for row, keys in tiny.items() for k in keys for a in ("--set", f"{row}:{k}")]]
    bench = load_script("scripts/bench_tdm_r1.py")
    assert bench.main(args) == 0
    result = json.loads((out / "bench_tdm_r1.json").read_text())
    summary = result["summary"]
    assert set(summary) == {"teacher", "student", *tiny}
    for row in tiny:
        assert summary[row]["start"] == ("teacher" if row == "dgpo_teacher" else "student"), row
        assert "mean" in summary[row]["gain"] and len(result["evaluations"][row]["sets"]) == 2, row
    assert "heldout_gain" in summary["r1_heldout"]
    runs = out / "bench_tdm_r1"
    cfg = yaml.safe_load((runs / "r1_heldout" / "config.yaml").read_text())
    assert cfg["r1"]["categories"] == ["single_object", "two_object", "counting", "colors"]
    assert cfg["objective"]["dm_target"] == "conditional"  # the released recipe's
    assert cfg["r1"]["init_run"] == str(student)
    assert cfg["student"]["ema_decay"] == 0  # evaluated on live weights, as the DGPO rows are
    sampler = json.loads((student / "final" / "lora" / "sampler.json").read_text())
    cfg = yaml.safe_load((runs / "dgpo_student" / "config.yaml").read_text())
    assert cfg["model"]["merge_lora"] == str(student / "final" / "lora")
    assert cfg["rollout"]["sigmas"] == pytest.approx(sampler["sigmas"]) and cfg["rollout"]["guidance_scale"] == 1.0
    assert (cfg["objective"]["t_min"], cfg["objective"]["kl_weight"]) == (0.4, 1.0)  # the DGPO recipe's
    for row, t_min, kl in [("dgpo_student_full", 0, 0), ("dgpo_student_full_kl", 0, 1.0)]:  # every σ of the student
        cfg = yaml.safe_load((runs / row / "config.yaml").read_text())
        assert (cfg["objective"]["t_min"], cfg["objective"]["kl_weight"]) == (t_min, kl), row
        assert cfg["rollout"]["sigmas"] == pytest.approx(sampler["sigmas"]), row
    cfg = yaml.safe_load((runs / "dm_dgpo_student" / "config.yaml").read_text())  # TDM + DGPO, DGPO's keys
    assert cfg["r1"]["reward_source"] == "direct" and cfg["surrogate"]["k_draw"] == "last"
    assert (cfg["surrogate"]["t_min"], cfg["surrogate"]["kl_weight"]) == (0.57, 1.0)
    cfg = yaml.safe_load((runs / "flow_grpo_student" / "config.yaml").read_text())
    assert cfg["objective"]["name"] == "flow_grpo" and cfg["rollout"]["sigmas"] == pytest.approx(sampler["sigmas"])
    cfg = yaml.safe_load((runs / "r1_released" / "config.yaml").read_text())
    assert cfg["objective"]["dm_target"] == "conditional" and cfg["advantage"]["std"] == "batch"
    assert cfg["r1"]["init_run"] == str(student) and cfg["student"]["ema_decay"] == 0
    assert result["loop_seconds"]["teacher"] > result["loop_seconds"]["student"] > 0
    assert (out / "bench_tdm_r1_grid.png").is_file() and (out / "bench_tdm_r1.png").is_file()
    table = (out / "bench_tdm_r1.md").read_text()
    assert "held-out categories" in table and "DGPO on the student's weights" in table
    assert "sharpness (/ start's)" in table and all("sharpness_ratio" in summary[row] for row in ("r1", "dgpo_student"))

    # a rerun trains nothing and evaluates nothing: the same numbers, read back, and the grid drawn again
    capsys.readouterr()
    (out / "bench_tdm_r1_grid.png").unlink()
    assert bench.main(args) == 0
    assert (out / "bench_tdm_r1_grid.png").is_file()
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == len(tiny) and ", seed set " not in printed
    assert json.loads((out / "bench_tdm_r1.json").read_text())["summary"] == summary


def test_bench_processes_share_evaluations_through_locks(tmp_path):
    """Two bench processes sharing OUT evaluate each model once: a model another live process holds is waited
    for and read; a lock left by a dead process is taken over."""
    import os
    import subprocess
    import sys
    bench = load_script("scripts/bench_tdm_r1.py")
    evals = tmp_path / "evals"
    made = []

    def evaluate_sets(name, build, args, evals_dir, log):
        made.append(name)
        (evals_dir / f"{name}.json").write_text(json.dumps({"sets": [name]}))
        return {"sets": [name]}

    bench.evaluate_sets = evaluate_sets
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a live "other process"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        evals.mkdir()
        (evals / "teacher.lock").write_text(str(other.pid))
        (evals / "student.lock").write_text(str(dead.pid))
        polls = []

        def log(line):  # the other process finishes the teacher while this one waits
            polls.append(line)
            (evals / "teacher.json").write_text(json.dumps({"sets": ["by the other process"]}))

        got = bench.evaluate_all({"teacher": (None,), "student": (None,), "r1": (None,)}, None, evals, log, poll_s=0)
    finally:
        other.kill()
    assert made == ["student", "r1"]  # the dead process's lock taken over; the live one's model not redone
    assert got["teacher"] == {"sets": ["by the other process"]} and polls
    assert not (evals / "student.lock").exists() and not (evals / "r1.lock").exists()
    assert os.path.exists(evals / "r1.json")


def test_summary_shows_sharpness_only_where_every_seed_set_has_it():
    """Evaluations stored before the sharpness measures existed have none: their rows show '-', the others the mean
    and the ratio to their start's."""
    bench = load_script("scripts/bench_tdm_r1.py")
    def sets(geneval, fd, sharp=None):
        extra = {} if sharp is None else {"sharpness": sharp, "edge_width": 1.5}
        return {"sets": [{"geneval": geneval + d, "fd": fd, "per_category": {}, **extra} for d in (0.0, 0.01)]}
    evals = {"student": sets(0.6, 0.3, 0.5), "r1": sets(0.7, 0.33, 0.4), "dgpo_student": sets(0.65, 0.3)}
    summary = bench.summarise(evals, {"r1": "student", "dgpo_student": "student"}, [])
    assert summary["r1"]["sharpness_ratio"] == pytest.approx(0.8) and summary["r1"]["edge_width_ratio"] == 1.0
    assert "sharpness" not in summary["dgpo_student"] and summary["r1"]["gain"]["mean"] == pytest.approx(0.1)
    table = bench.markdown(summary, {}, {"seed_sets": 2, "final_per_prompt": 1, "minutes": 1,
                                         "nfe": {"student": 4, "r1": 4, "dgpo_student": 4}})
    r1_line = next(line for line in table.splitlines() if line.startswith("| TDM-R1 on the student"))
    dgpo_line = next(line for line in table.splitlines() if line.startswith("| DGPO on the student's"))
    assert "0.400 (0.80)" in r1_line and "| - | - |" in dgpo_line
