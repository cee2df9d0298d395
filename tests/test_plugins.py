"""A method written in a test file — with its own config section — trains end to end through `dgpo train`
without touching the library: registering it is all it takes."""

from dataclasses import dataclass

import pytest
import yaml
from safetensors.torch import load_file

from dgpo.cli import main
from dgpo.config import option
from dgpo.methods import Objective, register_objective
from dgpo.methods.batch import group_noise_levels, group_shared_noise, per_sample_mse
from dgpo.models.handle import flow_interpolate
from test_train import TINY_RUN  # also registers the test reward


@dataclass
class RWRConfig:
    weight: float = option(1.0, "scale of the loss", min=0.0)


@register_objective
class RewardWeightedRegression(Objective):
    """Flow matching on the group's better-than-average samples: L = w · mean_i max(A_i, 0) · ℓ_θ,i."""

    name = "toy_rwr"
    label = "toy RWR"
    config_section = RWRConfig

    def backward(self, batch, gen, backward) -> dict:
        ids = batch.group_ids.cpu()
        sigma = group_noise_levels(ids, 0.0, self.shift, gen).to(batch.latents.device)
        noise = group_shared_noise(ids, tuple(batch.latents.shape[1:]), gen).to(batch.latents.device)
        v = self.model.velocity(flow_interpolate(batch.latents, noise, sigma), sigma, batch.embeds)
        loss = self.cfg.toy_rwr.weight * (batch.advantages.clamp(min=0) * per_sample_mse(noise - batch.latents, v)).mean()
        backward(loss)
        return {"loss": loss.item(), "toy_weight": self.cfg.toy_rwr.weight}


def _train(tiny_base, out, *extra):
    sets = [a for s in [f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN, *extra]
            for a in ("--set", s)]
    return main(["train", *sets, "--out", str(out)])


def test_a_registered_method_with_its_own_section_trains_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_base, out, "objective.name=toy_rwr", "toy_rwr.weight=0.5") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["toy_rwr"] == {"weight": 0.5}
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["toy_weight"] for r in rows if "loss" in r] == [0.5, 0.5]
    lora = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # it trained


def test_a_methods_section_is_checked_like_any_other(tiny_base, tmp_path, capsys):
    assert _train(tiny_base, tmp_path / "a", "objective.name=toy_rwr", "toy_rwr.nonsense=1") == 2
    assert "unknown config key 'toy_rwr.nonsense'" in capsys.readouterr().err
    assert _train(tiny_base, tmp_path / "b", "toy_rwr.weight=-1") == 2
    assert "toy_rwr.weight" in capsys.readouterr().err
    assert _train(tiny_base, tmp_path / "c", "objective.name=nope") == 2
    assert "toy_rwr" in capsys.readouterr().err  # the message lists the registered methods
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_method_cannot_take_a_shared_sections_name():
    class Clash(Objective):
        name = "run"
        config_section = RWRConfig
    with pytest.raises(ValueError, match="shared section 'run'"):
        register_objective(Clash)
