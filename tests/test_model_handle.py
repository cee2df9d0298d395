"""The model-handle protocol: the algorithms reach a model only through it.

A model family registered in this file — a handle that is not the SD3 one and exposes nothing but the
protocol (no pipeline) — trains with DGPO and distils with TDM unchanged; a folder of a family nobody
registered is one clear error.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dgpo.errors import UserError
from dgpo.models.handle import FlowModel, SD3Model
from dgpo.models.families import load_model, register_model_family


class ProtocolOnly:
    """A handle of a made-up family that forwards the protocol, and only the protocol, to an SD3 handle."""

    family = "protocol-only"
    source: Path  # the SD3 folder behind it (set by the test)

    def __init__(self, inner: SD3Model):
        self._inner = inner
        self.max_sequence_length = inner.max_sequence_length

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32):
        return cls(SD3Model.from_pretrained(cls.source, dtype))

    transformer = property(lambda self: self._inner.transformer)
    device = property(lambda self: self._inner.device)
    dtype = property(lambda self: self._inner.dtype)
    latent_shape = property(lambda self: self._inner.latent_shape)
    image_size = property(lambda self: self._inner.image_size)
    scheduler_config = property(lambda self: self._inner.scheduler_config)

    def to(self, device):
        self._inner.to(device)
        return self

    def with_transformer(self, transformer):
        return ProtocolOnly(self._inner.with_transformer(transformer))

    def __getattr__(self, name):
        protocol = {"lora_targets", "save_pretrained", "fuse_lora", "encode_prompts", "negative_embeds", "velocity",
                    "velocity_at_timestep", "guided_velocity", "guided_velocity_at_timestep", "encode_images",
                    "decode_latents", "frozen_modules"}
        if name in protocol:
            return getattr(self._inner, name)
        raise AttributeError(f"{name!r} is not part of the model-handle protocol")


@pytest.fixture
def protocol_only_base(tiny_base, tmp_path):
    folder = tmp_path / "protocol-only-model"
    folder.mkdir()
    index = json.loads((tiny_base / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ProtocolOnlyPipeline"}))
    ProtocolOnly.source = tiny_base
    register_model_family("ProtocolOnlyPipeline", ProtocolOnly)
    return folder


def test_sd3_handle_implements_the_protocol(tiny_base):
    model = load_model(tiny_base)
    assert isinstance(model, SD3Model) and isinstance(model, FlowModel)
    assert "to_q" in model.lora_targets("attention")
    with pytest.raises(UserError, match="attention_ff"):
        model.lora_targets("everything")


def test_a_folder_of_an_unregistered_family_is_one_clear_error(tiny_base, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_base, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "Kandinsky3Pipeline"}))
    with pytest.raises(UserError, match="holds a Kandinsky3Pipeline.*register_model_family"):
        load_model(folder)


def test_dgpo_and_tdm_run_on_a_handle_that_is_only_the_protocol(protocol_only_base, tmp_path):
    from dgpo.trainer import Trainer, load_train_config, prepare_run_dir
    from tdm_r1.config import load_distill_config
    from tdm_r1.distill import Distiller, prepare_run_dir as prepare_distill_dir

    cfg = load_train_config("configs/dgpo/shapes.yaml", [
        f"model.base={protocol_only_base}", f"run.out_dir={tmp_path / 'dgpo'}", "run.time_budget_min=0",
        "run.epochs=1", "rollout.prompts_per_epoch=2", "rollout.group_size=2", "rollout.steps=2",
        "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false", "eval.cache_initial=false",
        "model.lora_rank=2", "model.lora_alpha=2", "objective.timesteps_per_sample=1"])
    trainer = Trainer(prepare_run_dir(cfg, resume=False), log=lambda *a: None)
    assert isinstance(trainer.model, ProtocolOnly)
    trainer.run()
    assert (tmp_path / "dgpo" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    cfg = load_distill_config("configs/tdm/shapes.yaml", [
        f"teacher.base={protocol_only_base}", f"run.out_dir={tmp_path / 'tdm'}", "run.time_budget_min=0",
        "run.iterations=1", "optim.batch_size=2", "eval.per_prompt=1", "eval.fd=false", "student.mode=full",
        "fake.lora_rank=2", "fake.lora_alpha=2"])
    distiller = Distiller(prepare_distill_dir(cfg, resume=False), log=lambda *a: None)
    assert isinstance(distiller.student, ProtocolOnly)
    distiller.run()
    assert (tmp_path / "tdm" / "final" / "pipeline" / "model_index.json").is_file()
