"""Bad input gets a one-line error naming the problem and the fix (exit 2), and leaves no partial output."""

import json
import os

import pytest

from dgpo.cli import main


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def test_unknown_config_key_fails_before_any_work(tmp_path, capsys, cache_dir):
    before = sorted(os.listdir(cache_dir))
    assert main(["pretrain", "--set", "flow.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'flow.stepz'" in err and "allowed keys here" in err
    assert sorted(os.listdir(cache_dir)) == before  # nothing was trained or cached


def test_wrong_type_in_train_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", "rollout.group_size=eight"]) == 2
    assert "rollout.group_size: expected an integer, got 'eight'" in capsys.readouterr().err
    assert not out.exists()


def test_out_of_range_value(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "rollout.group_size=1"]) == 2
    assert "rollout.group_size: 1 is below the minimum 2" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "has no model_index.json" in err and "nope" in err
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_prompt_outside_grammar_in_eval(tiny_base, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\na photo of a purple dog\n")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_base), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "'a photo of a purple dog'" in capsys.readouterr().err
    assert not out.exists()


def test_empty_prompt_file(tiny_base, tmp_path, capsys):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n# only a comment\n")
    out = tmp_path / "s"
    assert main(["sample", "--model", str(tiny_base), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert not out.exists()
    assert main(["eval", "--model", str(tiny_base), "--prompts", str(prompts)]) == 2


def test_malformed_samples_folder(tmp_path, capsys):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "samples.jsonl").write_text('{"file": "00000.png"}\n')
    assert main(["eval", "--samples", str(folder)]) == 2
    assert "expected a JSON object with 'file' and 'prompt'" in capsys.readouterr().err


def test_sample_then_eval_a_folder(tiny_base, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(tiny_base), "--split", "test", "--out", str(out), "--steps", "2",
                 "--per-prompt", "2", "--seed", "3"]) == 0
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 33 and lines[0] == {**lines[0], "file": "00000.png", "seed": 3}
    assert (out / "grid.png").is_file() and (out / "00065.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left behind
    report = tmp_path / "r.json"
    assert main(["eval", "--samples", str(out), "--out", str(report), "--no-fd"]) == 0
    result = json.loads(report.read_text())
    assert result["n_images"] == 66 and 0.0 <= result["geneval"] <= 1.0
    assert set(result["per_category"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_help_explains_every_command(capsys):
    for cmd in ("pretrain", "sample", "eval", "train"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_train_help_lists_every_config_key_and_each_methods_section(capsys):
    """`dgpo train --help` and `tdm-r1 train --help` end with every key (the README sends users there)."""
    from dgpo.config import describe
    from dgpo.train_config import train_config_class
    from tdm_r1.cli import main as tdm_main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    keys = [line.strip().split(" = ")[0] for line in describe(train_config_class()) if " = " in line]
    assert "config keys" in out and all(f"  {k} = " in out for k in keys)
    assert {"objective.beta", "flow_grpo.kl_weight", "nft.beta", "diffusion_dpo.beta"} <= set(keys)
    assert "  optim.lr = 0.001 " in out  # the default recipe's value (configs/dgpo/shapes.yaml), not the field's 3e-4
    with pytest.raises(SystemExit):
        tdm_main(["train", "--help"])
    assert "  r1.init_lora = " in capsys.readouterr().out


@pytest.mark.parametrize("command, key", [(("dgpo", "pretrain"), "  data.fidelity = "),
                                          (("dgpo", "pretrain"), "  threads = "),
                                          (("tdm-r1", "surrogate"), "  surrogate.lr = ")])
def test_every_config_command_help_lists_its_keys(capsys, command, key):
    """Every command that takes `--set` lists its config keys in `--help` (the README sends users there)."""
    from tdm_r1.cli import main as tdm_main
    with pytest.raises(SystemExit):
        (main if command[0] == "dgpo" else tdm_main)([command[1], "--help"])
    out = capsys.readouterr().out
    assert "config keys (--set KEY=VALUE)" in out and key in out


@pytest.mark.parametrize("argv, message", [
    (["dgpo", "sample", "--split", "test", "--per-prompt", "0", "--out", "s"], "argument --per-prompt: must be at least 1, got 0"),
    (["dgpo", "eval", "--per-prompt", "-5"], "argument --per-prompt: must be at least 1, got -5"),
    (["dgpo", "sample", "--split", "test", "--cfg", "inf", "--out", "s"], "argument --cfg: must be a finite number, got 'inf'"),
    (["dgpo", "sample", "--split", "test", "--steps", "2.5", "--out", "s"], "argument --steps: expected a whole number, got '2.5'"),
    (["tdm-r1", "sample", "--lora", "x", "--nfe", "0", "--split", "test", "--out", "s"], "argument --nfe/--steps: must be at least 1"),
    (["dgpo", "serve-reward", "shapes_partial", "--port", "-1"], "argument --port: must be at least 0, got -1"),
])
def test_absurd_flags_are_one_line_with_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tdm_r1.cli import main as tdm_main
    with pytest.raises(SystemExit) as exit_:
        (main if argv[0] == "dgpo" else tdm_main)(argv[1:])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0] and "--help" in err[0]
    assert not any(tmp_path.iterdir())
