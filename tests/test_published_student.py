"""A published TDM student (the released TDM-R1 code's EMA checkpoint: a bare list of LoRA tensors in PEFT
order, rank 32, alpha 64, on the joint attention ``attn`` only) converts into our LoRA folder, loads in stock
diffusers with the outputs of the original adapter, and starts `tdm-r1 train` (``r1.init_lora``)."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model

from tdm_r1.cli import main
from tdm_r1.distill import STUDENT
from tdm_r1.reinforce import Reinforcer
from tdm_r1.published import RELEASED_TARGETS, released_levels
from tests.test_tdm_r1 import tiny_cfg


@pytest.fixture(scope="module")
def sd35_layout(tiny_base, tmp_path_factory):
    """The tiny base with SD3.5-Medium's layout: block 0 has the second attention ``attn2`` (MMDiT-X)."""
    folder = tmp_path_factory.mktemp("sd35") / "pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(**{**config, "dual_attention_layers": (0,)})
    pipe.save_pretrained(str(folder))
    return folder


def released_student(pipeline_dir, path, seed=0):
    """Write a checkpoint as the released code does (three adapters by get_peft_model, the "tdm" ones listed
    in named_parameters order, torch.save of the EMA state) and return (peft model, inputs, its output)."""
    transformer = SD3Transformer2DModel.from_pretrained(str(pipeline_dir), subfolder="transformer")
    config = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=list(RELEASED_TARGETS))
    model = get_peft_model(transformer, config, adapter_name="tdm")
    model.add_adapter("fake", config)
    gen = torch.Generator().manual_seed(seed)
    tdm = [p for n, p in model.named_parameters() if "tdm" in n]
    with torch.no_grad():
        for p in tdm:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    torch.save({"decay": 0.99, "ema_parameters": [p.detach().clone() for p in tdm]}, path)
    model.set_adapter("tdm")
    size, dim = transformer.config.sample_size, transformer.config.joint_attention_dim
    inputs = dict(hidden_states=torch.randn((2, transformer.config.in_channels, size, size), generator=gen),
                  encoder_hidden_states=torch.randn((2, 5, dim), generator=gen),
                  pooled_projections=torch.randn((2, transformer.config.pooled_projection_dim), generator=gen),
                  timestep=torch.tensor([900.0, 400.0]))
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert "attn2" not in " ".join(n for n, _ in model.named_parameters() if "lora_A.tdm" in n)
    return inputs, out


def test_released_levels():
    assert released_levels() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=2e-3)


def test_convert_loads_in_stock_diffusers_with_the_original_outputs(sd35_layout, tmp_path):
    ckpt = tmp_path / "ema.ckpt"
    inputs, expected = released_student(sd35_layout, ckpt)
    assert main(["convert", str(ckpt), "--model", str(sd35_layout), "--out", str(tmp_path / "student")]) == 0
    settings = json.loads((tmp_path / "student" / "sampler.json").read_text())
    assert settings["boundaries"] == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=2e-3)
    assert settings["num_inference_steps"] == 4 and settings["guidance_scale"] == 1.0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35_layout), text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        base = pipe.transformer(**inputs, return_dict=False)[0]
    pipe.load_lora_weights(str(tmp_path / "student"))
    with torch.no_grad():
        got = pipe.transformer(**inputs, return_dict=False)[0]
    assert (expected - base).abs().max() > 1e-2  # the student is not the base ...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)  # ... and converts to itself


def test_r1_starts_from_the_converted_student(sd35_layout, tmp_path):
    ckpt = tmp_path / "ema.ckpt"
    inputs, expected = released_student(sd35_layout, ckpt, seed=1)
    assert main(["convert", str(ckpt), "--model", str(sd35_layout), "--out", str(tmp_path / "student")]) == 0
    # our student adapter has another alpha (scale 1, not 2) and also covers attn2: rescaled, and attn2 adds 0
    d = Reinforcer(tiny_cfg(sd35_layout, tmp_path / "r1", f"r1.init_lora={tmp_path / 'student'}",
                           "student.lora_rank=32", "student.lora_alpha=32", "run.iterations=2"))
    assert d.boundaries == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=2e-3)  # from its sampler.json
    transformer = d.teacher.transformer
    with torch.no_grad(), d.adapters.active(STUDENT):
        got = transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert d.run()["last"]["iteration"] == 2  # and TDM-R1 trains it


def test_convert_refuses_bad_checkpoints_in_one_line(sd35_layout, tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"ema_parameters": [torch.zeros(4, 4)] * 3}, wrong)
    for ckpt, says in ((garbage, "is not a plain state dict"), (wrong, "holds 3 tensors"),
                       (tmp_path / "missing.ckpt", "no published student checkpoint")):
        assert main(["convert", str(ckpt), "--model", str(sd35_layout), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "out").exists()  # nothing written


def test_init_lora_and_init_run_are_exclusive(tiny_base, tmp_path):
    from dgpo.errors import UserError
    with pytest.raises(UserError, match="keep one"):
        Reinforcer(tiny_cfg(tiny_base, tmp_path / "r1", "r1.init_lora=somewhere", "r1.init_run=elsewhere"))
