"""Typed configs: strict loading, dotted overrides, clear errors naming the key."""

import pytest

from dgpo.config import ConfigError, describe, load_config, to_dict
from dgpo.worlds.shapes_base.pretrain import PretrainConfig


def test_defaults_and_yaml_roundtrip(tmp_path):
    cfg = load_config(PretrainConfig, "configs/base/shapes.yaml")
    path = tmp_path / "c.yaml"
    import yaml
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(PretrainConfig, path) == cfg


def test_dotted_overrides_parse_values():
    cfg = load_config(PretrainConfig, None, ["flow.lr=1e-4", "model.transformer.num_layers=3",
                                             "model.vae.block_out_channels=[8, 16]", "flow.ema_decay=0"])
    assert cfg.flow.lr == 1e-4 and isinstance(cfg.flow.lr, float)
    assert cfg.model.transformer.num_layers == 3
    assert cfg.model.vae.block_out_channels == [8, 16]
    assert cfg.flow.ema_decay == 0.0


@pytest.mark.parametrize("override, fragment", [
    ("flow.lrr=1", "unknown config key 'flow.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("flow.steps=many", "flow.steps: expected an integer"),
    ("flow.steps=1.5", "flow.steps: expected an integer"),
    ("model.transformer.qk_norm=layer", "model.transformer.qk_norm: 'layer' is not allowed"),
    ("flow.caption_dropout=1.5", "flow.caption_dropout: 1.5 is above the maximum 1.0"),
    ("flow.lr=-1", "flow.lr: -1.0 is below the minimum 0.0"),
    ("flow.lr=nan", "flow.lr: expected a finite number, got 'nan'"),   # nan passes every bound check
    ("flow.lr=inf", "flow.lr: expected a finite number"),
    ("flow.caption_dropout=.nan", "flow.caption_dropout: expected a finite number"),
    ("model.vae.mid_attention=3", "model.vae.mid_attention: expected true or false"),
    ("model.vae.block_out_channels=7", "model.vae.block_out_channels: expected a list"),
    ("flow=3", "flow: expected a mapping"),
    ("flowlr", "must look like key.sub=value"),
])
def test_bad_values_fail_at_load_time_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, [override])
    assert fragment in str(e.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("flow:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'flow.stepz'; allowed keys here: \[.*'steps'"):
        load_config(PretrainConfig, path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigError, match="'.*configs' is a folder; pass a YAML file"):
        load_config(PretrainConfig, tmp_path / "configs")
    bad = tmp_path / "bad.yaml"
    bad.write_text("flow: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PretrainConfig, listy)


def test_every_field_is_documented_and_grouped_by_section():
    lines = [line.strip() for line in describe(PretrainConfig)]
    keys, headers = [l for l in lines if " = " in l], [l for l in lines if l.startswith("[")]
    assert any(line.startswith("flow.lr = ") for line in keys) and "[flow]" in {h.split()[0] for h in headers}
    for line in keys:
        assert line.split(": ", 1)[1].strip(), f"field without help text: {line}"
    for line in headers:
        assert line.split("] ", 1)[1].strip(), f"section without help text: {line}"


def test_a_run_carries_its_own_methods_section_only(tmp_path):
    """Config by selection: a DGPO run has no baseline's section, a Flow-GRPO run has its own; setting another
    method's keys is one clear error; a config written with every method's section (an older run) still reads."""
    import dataclasses
    import yaml
    from dgpo.train_config import train_config_class
    from dgpo.trainer import load_train_config
    sections = lambda cfg: {f.name for f in dataclasses.fields(cfg)}  # noqa: E731
    dgpo_run = load_train_config("configs/dgpo/shapes.yaml")
    assert not {"flow_grpo", "nft", "diffusion_dpo"} & sections(dgpo_run)
    grpo_run = load_train_config("configs/flow_grpo/shapes.yaml")
    assert "flow_grpo" in sections(grpo_run) and not {"nft", "diffusion_dpo"} & sections(grpo_run)
    with pytest.raises(ConfigError, match="section flow_grpo: sets keys of objective.name=flow_grpo"):
        load_train_config("configs/dgpo/shapes.yaml", ["flow_grpo.kl_weight=0.1"])
    older = tmp_path / "older.yaml"
    older.write_text(yaml.safe_dump(to_dict(load_config(train_config_class(), "configs/dgpo/shapes.yaml"))))
    assert to_dict(load_config(train_config_class(), older))["objective"] == to_dict(dgpo_run)["objective"]


def test_patch1_base_config_differs_from_the_default_only_in_patch_size():
    """docs/experiments/base-models.md compares the two bases as one controlled change: keep it that way."""
    default = to_dict(load_config(PretrainConfig, "configs/base/shapes.yaml"))
    patch1 = to_dict(load_config(PretrainConfig, "configs/base/shapes_patch1.yaml"))
    assert patch1["model"]["transformer"].pop("patch_size") == 1
    assert default["model"]["transformer"].pop("patch_size") == 2
    assert patch1 == default


def test_a_choice_yaml_reads_as_a_boolean_is_that_choice():
    from dgpo.trainer import load_train_config
    for word in ("no", "'no'"):  # unquoted, YAML 1.1 reads no as false
        assert load_train_config("configs/dgpo/shapes.yaml", [f"model.mixed_precision={word}"]).model.mixed_precision == "no"
    with pytest.raises(ConfigError, match="model.mixed_precision: expected a string, got True"):
        load_train_config("configs/dgpo/shapes.yaml", ["model.mixed_precision=yes"])  # no such choice


@pytest.mark.parametrize("text,lines", [("run:\n  seed: 3\nmodel:\n  lora_rank: 4\nrun:\n  epochs: 2\n", (1, 5)),
                                        ("run:\n  seed: 3\n  seed: 4\n", (2, 3))])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, lines):
    """YAML would keep the second silently (a second `run:` section dropped the first one's seed)."""
    from dgpo.trainer import load_train_config
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"given twice, at lines {lines[0]} and {lines[1]}"):
        load_train_config(path)


@pytest.mark.parametrize("betas,fragment", [("[0.9]", "a list of 2 items"), ("[1.5, 2]", "above the maximum"),
                                            ("[0.9, 0.999, 0.5]", "a list of 2 items"), ("[-0.1, 0.9]", "below the minimum")])
def test_adams_betas_are_two_numbers_in_0_1(betas, fragment):
    from dgpo.trainer import load_train_config
    from tdm_r1.config import load_distill_config
    for load in (lambda o: load_train_config(None, o), lambda o: load_distill_config(None, o)):
        with pytest.raises(ConfigError, match=f"optim.betas: .*{fragment}"):
            load([f"optim.betas={betas}"])


def test_a_served_rewards_score_range_is_empty_or_two_numbers():
    from dgpo.trainer import load_train_config
    assert load_train_config(None, ["reward.score_range=[0, 1]"]).reward.score_range == [0.0, 1.0]
    with pytest.raises(ConfigError, match="reward.score_range: expected a list of 0 or 2 items"):
        load_train_config(None, ["reward.score_range=[1]"])
