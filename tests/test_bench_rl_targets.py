"""bench_rl's time to each target (the base + 0.02 … + 0.20): when a run reaches each, the bound when it never does,
its ratio to DGPO's on the same seed with what kind of number that is, and the report that --report-only rebuilds
from the run folders. No training: evaluation rows are written by hand, as the trainer writes them."""

import json

import pytest

from conftest import load_script

bench = load_script("scripts/bench_rl.py")


def evaluation(score: float, minutes: float, se: float | None = 0.015) -> dict:
    """A metrics.jsonl evaluation row, NFE 1000 per training minute."""
    return {"epoch": int(minutes * 10), "eval_geneval": score, "eval_geneval_se": se, "train_seconds": minutes * 60,
            "nfe": int(minutes * 1000), "eval_per_category": {"single_object": score}, "eval_fd": 0.2}


def curve(*points: tuple[float, float], base: float = 0.5) -> list[dict]:
    """The base's evaluation at minute 0, then (minutes, score) evaluations (scores off the targets' exact values:
    the rule compares floats as they are, and 0.5 + 0.07 > 0.57)."""
    return [evaluation(base, 0.0)] + [evaluation(score, minutes) for minutes, score in points]


def test_a_target_counts_only_when_two_evaluations_in_a_row_reach_it():
    evals = curve((3, 0.56), (6, 0.52), (9, 0.56), (12, 0.57))
    at = bench.reached_at(evals, 0.55)            # 0.56 at 3 min alone does not count: 0.52 follows
    assert at == {"minutes": 9.0, "nfe": 9000, "bound": False, "first_evaluation": False}
    first = bench.reached_at(evals, 0.51)         # held from the first evaluation on: at or before 3 min
    assert first == {"minutes": 3.0, "nfe": 3000, "bound": False, "first_evaluation": True}
    assert bench.reached_at(evals, 0.5)["minutes"] == 3.0   # the base's own evaluation never counts


def test_a_target_never_reached_gives_the_last_evaluation_as_a_lower_bound():
    evals = curve((3, 0.56), (6, 0.52), (9, 0.57))   # 0.57 once, at the last evaluation: not held
    assert bench.reached_at(evals, 0.57) == {"minutes": 9.0, "nfe": 9000, "bound": True, "first_evaluation": False}
    assert bench.reached_at(evals, 0.9)["bound"] is True


def test_the_ratio_to_dgpo_and_what_kind_of_number_it_is():
    at = lambda minutes, bound=False, first=False: {"minutes": minutes, "nfe": 1000 * minutes, "bound": bound,
                                                    "first_evaluation": first}
    assert bench.ratio_to_dgpo(at(30), at(6)) == {"time": 5.0, "nfe": 5.0, "kind": "measured"}
    assert bench.ratio_to_dgpo(at(60, bound=True), at(6)) == {"time": 10.0, "nfe": 10.0, "kind": "lower"}
    # DGPO reached it at its first evaluation: its time is at most 3, so the ratio at least 10
    assert bench.ratio_to_dgpo(at(30), at(3, first=True)) == {"time": 10.0, "nfe": 10.0, "kind": "lower"}
    assert bench.ratio_to_dgpo(at(60, bound=True), at(3, first=True))["kind"] == "lower"
    assert bench.ratio_to_dgpo(at(3, first=True), at(6)) == {"time": 0.5, "nfe": 0.5, "kind": "upper"}
    assert bench.ratio_to_dgpo(at(3, first=True), at(3, first=True)) == {"time": None, "nfe": None,
                                                                         "kind": "unresolved"}
    assert bench.ratio_to_dgpo(at(30), at(33, bound=True)) is None      # DGPO never reached it: undefined
    cells = [bench.format_ratio(bench.ratio_to_dgpo(a, d), "minutes") for a, d in
             [(at(30), at(6)), (at(60, bound=True), at(6)), (at(3, first=True), at(6)),
              (at(3, first=True), at(3, first=True)), (at(30), at(33, bound=True))]]
    assert cells == ["5.00×", "≥ 10.00×", "≤ 0.50×", "?", ""]
    assert [bench.format_reached(a, "minutes") for a in (at(30), at(60.1, bound=True), at(3.1, first=True))] == [
        "30.0", "> 60.1", "≤ 3.1"]


def test_ratios_are_to_dgpo_on_the_same_seed_and_left_out_where_dgpo_never_got_there():
    curves = {"dgpo-seed0": curve((3, 0.53), (6, 0.56), (9, 0.575)),   # +0.05 at 6 min; +0.07 never
              "nft-seed0": curve((3, 0.515), (6, 0.52), (12, 0.575), (15, 0.58)),
              "dgpo-seed1": curve((3, 0.515), (6, 0.53), (9, 0.555), (12, 0.56)),  # +0.05 at 9; +0.01 at once
              "nft-seed1": curve((3, 0.515), (6, 0.515), (27, 0.555), (30, 0.555))}
    methods = {name: name.split("-seed")[0] for name in curves}
    seeds = {name: int(name[-1]) for name in curves}
    targets = bench.targets_report(curves, methods, seeds, confirm=2, per_prompt=32, gains=(0.01, 0.05, 0.07))
    runs = targets["runs"]
    assert targets["base"] == 0.5 and targets["per_prompt"] == 32 and targets["evaluation_se"] == pytest.approx(0.015)
    assert runs["dgpo-seed0"]["ratio_to_dgpo"] == {} and runs["nft-seed0"]["dgpo_run"] == "dgpo-seed0"
    assert runs["nft-seed0"]["ratio_to_dgpo"]["0.05"] == {"time": 2.0, "nfe": 2.0, "kind": "measured"}   # 12 / 6
    assert runs["nft-seed1"]["ratio_to_dgpo"]["0.05"] == {"time": 3.0, "nfe": 3.0, "kind": "measured"}   # 27 / 9
    assert runs["nft-seed1"]["ratio_to_dgpo"]["0.01"]["kind"] == "unresolved"   # both held it from 3 min on
    assert "0.07" not in runs["nft-seed0"]["ratio_to_dgpo"]                      # DGPO's seed 0 never held +0.07
    assert runs["nft-seed0"]["at"]["0.07"] == {"minutes": 12.0, "nfe": 12000, "bound": False,
                                               "first_evaluation": False}


def test_report_only_rebuilds_the_target_tables_and_plot_from_the_run_folders(tmp_path):
    out = tmp_path / "bench"
    rows = {"dgpo-seed0": curve((3, 0.58), (6, 0.66), (9, 0.69), (12, 0.71)),
            "nft-seed0": curve((3, 0.51), (6, 0.53), (9, 0.54), (12, 0.56)),
            "dgpo-seed1": curve((3, 0.56), (6, 0.60), (9, 0.62)),
            "nft-seed1": curve((3, 0.53), (6, 0.555), (9, 0.555))}
    for name, evals in rows.items():
        (out / "bench_rl" / name / "final").mkdir(parents=True)
        (out / "bench_rl" / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in evals) + "\n")
    assert bench.main(["--out", str(out), "--report-only", "--seeds", "0,1", "--methods", "dgpo,nft"]) == 0
    table = (out / "bench_rl.md").read_text()
    gains = [f"+{0.01 * k:.2f}" for k in range(2, 21)]
    for gain in gains:                             # a row in the minutes table and one in the NFE table
        assert table.count(f"| {gain} | ") == 2, gain
    assert "| +0.01 | " not in table and "| +0.21 | " not in table
    assert "standard error of 0.015" in table and "32 images per test prompt" in table
    # +0.05: DGPO holds it from its first evaluation on both seeds; NFT from 6 min (seed 1) and never (seed 0)
    assert "| +0.05 | 0.550 | ≤ 3.0 | > 12.0 (≥ 4.00×) | ≤ 3.0 | 6.0 (≥ 2.00×) |" in table
    # +0.20: DGPO never holds it on seed 0 (0.71 once, at its last evaluation): a bound, and no ratios
    assert "| +0.20 | 0.700 | > 12.0 | > 12.0 | > 9.0 | > 9.0 |" in table
    report = json.loads((out / "bench_rl.json").read_text())
    assert report["targets"]["gains"] == [round(0.01 * k, 2) for k in range(2, 21)]
    assert report["targets"]["runs"]["nft-seed0"]["at"]["0.05"] == {"minutes": 12.0, "nfe": 12000, "bound": True,
                                                                     "first_evaluation": False}
    assert (out / "bench_rl_targets.png").stat().st_size > 0


def test_the_noise_line_names_the_per_prompt_count_when_rows_carry_no_standard_error():
    evals = [evaluation(0.5, 0, se=None), evaluation(0.6, 3, se=None), evaluation(0.6, 6, se=None)]
    targets = bench.targets_report({"dgpo": evals}, {"dgpo": "dgpo"}, {"dgpo": 0}, per_prompt=16)
    assert targets["evaluation_se"] is None
    text = bench.targets_markdown(targets)
    assert "The evaluations used 16 images per test prompt." in text and "standard error" not in text


def test_a_users_file_named_like_the_targets_plot_is_left_alone(tmp_path, capsys):
    mine = tmp_path / "bench_rl_targets.png"
    mine.write_text("my own plot\n")
    assert bench.main(["--out", str(tmp_path), "--report-only", "--methods", "dgpo"]) == 2
    assert "bench_rl_targets.png exists and is not part of a report bench_rl wrote" in capsys.readouterr().err
    assert mine.read_text() == "my own plot\n" and not (tmp_path / "bench_rl.json").exists()


def test_every_run_evaluates_densely_early_then_at_the_regular_cadence():
    """The benchmark's shared settings give every method the dense early cadence (--early-eval-minutes for the
    first --early-minutes) and the regular one after, as keys of its config."""
    from types import SimpleNamespace
    from dgpo.trainer import load_train_config
    bench = load_script("scripts/bench_rl.py")
    args = SimpleNamespace(budget_minutes=None, target_gain=0.2, threads=1, prompts=8, group_size=8, lora_rank=16,
                           eval_minutes=3.0, per_prompt=32, early_eval_minutes=0.5, early_minutes=5.0)
    cfg = load_train_config("configs/flow_grpo/shapes.yaml", bench.shared_settings(args, "base", 0, 240.0))
    assert (cfg.eval.early_every_minutes, cfg.eval.early_minutes, cfg.eval.every_minutes) == (0.5, 5.0, 3.0)
    assert (cfg.run.time_budget_min, cfg.run.stop_at_gain) == (240.0, 0.2)
