"""Every script that writes a report (JSON + markdown + plots under fixed names) leaves a file of those names alone
unless the script wrote it: refused with one line and exit status 2, before any work, the file unchanged."""

import json
from pathlib import Path

import pytest

from conftest import load_script
from dgpo.errors import UserError
from dgpo.runtime.output_dir import check_report_outputs, write_json_output, write_report_json

MINE = "my own notes\n"


def test_a_companion_is_replaced_only_beside_the_tools_own_json(tmp_path):
    """--overwrite replaces a report's markdown only when the JSON beside it is the tool's: a user's file that
    merely has the report's name is refused even with --overwrite (the rule bench_tdm and eval_noise promise)."""
    report, table = tmp_path / "r.json", tmp_path / "r.md"
    table.write_text(MINE)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="r.md exists and is not part of a report bench wrote "
                                            "\\(no r.json of bench's beside it\\): it is left as it is"):
            check_report_outputs(report, [table], "bench", overwrite)
    write_json_output(report, {"x": 1}, "other tool")
    with pytest.raises(UserError, match="was not written by bench .*move it aside"):
        check_report_outputs(report, [table], "bench", True)
    report.unlink()
    write_json_output(report, {"x": 1}, "bench")
    with pytest.raises(UserError, match="r.json' already exists; pass a new path, or --overwrite"):
        check_report_outputs(report, [table], "bench", False)
    check_report_outputs(report, [table], "bench", True)  # the tool's own report: replaced with --overwrite
    assert table.read_text() == MINE


def test_the_report_is_checked_again_when_it_is_written(tmp_path):
    """A file that appears under a report's name during the work (checked at the start, written at the end) is
    refused at the end too, and nothing is written; a folder is never taken for a JSON file, even an empty one."""
    files = [tmp_path / "r.json", tmp_path / "r.md"]
    check_report_outputs(files[0], files[1:], "bench", overwrite=True)
    files[1].write_text(MINE)  # the user saves a note of that name while the benchmark trains
    with pytest.raises(UserError, match="not part of a report bench wrote"):
        write_report_json(files, {"x": 1}, "bench", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"] and files[1].read_text() == MINE
    (tmp_path / "empty").mkdir()
    for check in (lambda: write_json_output(tmp_path / "empty", {"x": 1}, "bench"),
                  lambda: check_report_outputs(tmp_path / "empty", [], "bench", True)):
        with pytest.raises(UserError, match="is a folder: pass the path of a JSON file"):
            check()
    assert not any((tmp_path / "empty").iterdir())


def refused(capsys, run, path: Path) -> str:
    """``run()`` exits 2 with one line on stderr and ``path`` (a user's file) unchanged; the line."""
    assert run() == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.read_text() == MINE
    return lines[0]


def users_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(MINE)
    return folder / name


@pytest.mark.parametrize("script, name", [("scripts/memory_profile.py", "memory_profile"),
                                          ("scripts/load_reward_server.py", "reward_server_load")])
@pytest.mark.parametrize("ext", ["json", "md", "png"])
def test_the_profilers_refuse_a_users_file_before_any_work(script, name, ext, tmp_path, capsys, monkeypatch):
    module = load_script(script)
    work = "peak_rss_of" if "memory" in script else "run_load"
    monkeypatch.setattr(module, work, lambda *a, **k: pytest.fail("the work started"))
    mine = users_file(tmp_path, f"{name}.{ext}")
    for extra in ([], ["--overwrite"]):
        refused(capsys, lambda: module.main(["--out-dir", str(tmp_path), *extra]), mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def test_a_profiler_replaces_its_own_report_with_overwrite(tmp_path):
    load = load_script("scripts/load_reward_server.py")
    result = load.run_load(clients=1, batches=2, batch=2, size=8, fault_every=0, max_seconds=60)
    first = load.write_report(result, tmp_path, "load")
    assert json.loads(first[0].read_text())["written_by"] == "load_reward_server"
    with pytest.raises(UserError, match="already exists"):
        load.write_report(result, tmp_path, "load")
    assert load.write_report(result, tmp_path, "load", overwrite=True) == first


def test_bench_rl_rewrites_its_own_report_and_refuses_a_users_file(tmp_path, capsys):
    bench = load_script("scripts/bench_rl.py")
    out = tmp_path / "bench"
    for _ in range(2):  # a rerun (the benchmark resumes) rewrites its own report without asking
        assert bench.main(["--out", str(out), "--report-only", "--methods", "dgpo"]) == 0
    assert json.loads((out / "bench_rl.json").read_text())["written_by"] == "bench_rl"
    capsys.readouterr()
    for name in ("bench_rl.json", "bench_rl.md", "bench_rl.png"):
        other = tmp_path / name
        mine = users_file(other, name)
        line = refused(capsys, lambda: bench.main(["--out", str(other), "--report-only", "--methods", "dgpo"]), mine)
        assert "bench_rl" in line and "left as it is" in line
        assert [p.name for p in other.iterdir()] == [name]


def test_bench_tdm_r1_refuses_a_users_file_before_reading_its_student(tmp_path, capsys):
    bench = load_script("scripts/bench_tdm_r1.py")
    mine = users_file(tmp_path, "bench_tdm_r1_grid.png")
    line = refused(capsys, lambda: bench.main(["--student", str(tmp_path / "no-student"), "--out", str(tmp_path)]),
                   mine)
    assert "not part of a report bench_tdm_r1 wrote" in line and not (tmp_path / "bench_tdm_r1").exists()


def test_the_gpu_checks_refuse_a_users_file_of_their_reports_name(tmp_path, capsys, monkeypatch):
    for script, name, builds in (("scripts/gpu_speed_check.py", "gpu_speed_check.json",
                                  ("sd35_medium_pipeline", "build_flux_like")),
                                 ("scripts/gpu_scale_check.py", "gpu_scale_check.json", ("sd35_medium_pipeline",))):
        check = load_script(script)
        for build in builds:
            monkeypatch.setattr(check, build, lambda *a, **k: pytest.fail("the work started"))
        capsys.readouterr()  # what importing the libraries printed
        mine = users_file(tmp_path, name)
        refused(capsys, lambda: check.main(["--out", str(tmp_path)]), mine)


@pytest.mark.parametrize("script", ["scripts/diagnostics/diag_shapes.py", "scripts/diagnostics/diag_relations.py"])
def test_the_diagnostics_refuse_a_users_out_file(script, tmp_path, capsys, monkeypatch):
    diag = load_script(script)
    import dgpo.cli
    monkeypatch.setattr(dgpo.cli, "load_model", lambda *a: pytest.fail("the work started"))
    mine = users_file(tmp_path, "report.json")
    for extra, said in (([], "already exists"), (["--overwrite"], "was not written by")):
        assert said in refused(capsys, lambda: diag.main(["--out", str(mine), *extra]), mine)


def test_bad_inputs_refuses_a_users_file_before_running_its_cases(tmp_path, capsys, monkeypatch):
    diag = load_script("scripts/diagnostics/bad_inputs.py")
    monkeypatch.setattr(diag, "run_case", lambda *a: pytest.fail("the work started"))
    mine = users_file(tmp_path, "bad_inputs.md")
    for extra in ([], ["--overwrite"]):
        refused(capsys, lambda: diag.main(["--out", str(tmp_path), *extra]), mine)


def test_outcome_margins_summarises_logs_and_flags_a_margin_below_3(tmp_path, capsys):
    """scripts/diagnostics/outcome_margins.py --from-logs: per test and quantity (seeds folded), the smallest and
    largest margin; exit status 1 when one is below 3×; a user's file of a report's name is left alone."""
    script = load_script("scripts/diagnostics/outcome_margins.py")
    log = tmp_path / "a.jsonl"
    rows = [{"test": f"tests/t.py::test_x[seed{s}-m]", "what": "rise", "effect": e, "required": 0.01,
             "margin": e / 0.01, "threads": t} for s, e, t in ((0, 0.05, 1), (1, 0.02, 1), (0, 0.06, 2))]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.main(["--from-logs", str(log), "--out-dir", str(tmp_path / "out")]) == 1   # 2.0× at seed 1
    (entry,) = json.loads((tmp_path / "out" / "outcome_margins.json").read_text())["tests"]
    assert entry["test"] == "tests/t.py::test_x[m]" and entry["runs"] == 3
    assert (entry["min_margin"], entry["max_margin"]) == pytest.approx((2.0, 6.0))
    assert "**below 3×**" in (tmp_path / "out" / "outcome_margins.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "outcome_margins.md").write_text("my notes")
    assert script.main(["--from-logs", str(log), "--out-dir", str(mine)]) == 2
    assert (mine / "outcome_margins.md").read_text() == "my notes" and "left as it is" in capsys.readouterr().err
