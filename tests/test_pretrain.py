"""The optional decoder-refinement stage: it reuses the cached stage-1–2 base, leaves the encoder and the
transformer untouched, and agrees with pretraining in one go."""

from dataclasses import replace

import torch

from dgpo.models.handle import load_pipeline
from dgpo.worlds.shapes_base.pretrain import base_dir, base_key, ensure_base, pretrain, stage12_config


def _refined(cfg, steps=30):
    return replace(cfg, decoder=replace(cfg.decoder, steps=steps, batch_size=8, lr=1e-3))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_without_refinement_the_key_is_the_stage12_key(tiny_base_cfg):
    assert base_key(stage12_config(_refined(tiny_base_cfg))) == base_key(tiny_base_cfg)
    assert base_key(_refined(tiny_base_cfg)) != base_key(tiny_base_cfg)
    assert base_key(_refined(tiny_base_cfg, 30)) != base_key(_refined(tiny_base_cfg, 31))


def test_refinement_reuses_the_cached_base_and_changes_only_the_decoder(tiny_base_cfg, tmp_path, monkeypatch):
    """The stage-1–2 base is pretrained here, in a cache of this test's own: the session's tiny base may have been
    cached by a command another test started under another thread count, whose floats the one-go pretraining
    below (this process) would not reproduce to 1e-6."""
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    tiny_base = ensure_base(tiny_base_cfg, log=lambda *a: None)
    cfg = _refined(tiny_base_cfg)
    logs = []
    refined_dir = ensure_base(cfg, log=logs.append)
    assert refined_dir == base_dir(cfg) != tiny_base
    assert any("reusing the cached stage-1–2 base" in line for line in logs), logs

    before, after = load_pipeline(tiny_base), load_pipeline(refined_dir)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        a, b = _state(getattr(before, name)), _state(getattr(after, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    enc_a, enc_b = _state(before.vae.encoder), _state(after.vae.encoder)
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    assert before.vae.config.scaling_factor == after.vae.config.scaling_factor
    dec_a, dec_b = _state(before.vae.decoder), _state(after.vae.decoder)
    assert any(not torch.equal(dec_a[k], dec_b[k]) for k in dec_a)

    import json
    summary = json.loads((refined_dir / "pretrain_summary.json").read_text())
    assert summary["key"] == base_key(cfg) and "decoder_reconstruction_accuracy" in summary

    # one go (stages 1–3 in one process) gives the same decoder as refining the cached base
    torch.manual_seed(0)  # the tiny_base fixture pretrained under this global seed
    pretrain(cfg, tmp_path / "one-go", log=lambda *a: None)
    one_go = _state(load_pipeline(tmp_path / "one-go").vae.decoder)
    assert all(torch.allclose(one_go[k], dec_b[k], atol=1e-6) for k in dec_b)


def test_first_use_inside_a_no_grad_block_pretrains(tmp_path, monkeypatch):
    """A base is built lazily by whatever needs it first, possibly from inside a no-grad evaluation."""
    from conftest import TINY_BASE, TINY_BASE_CONFIG
    from dgpo.cli import load_base_config
    from dgpo.worlds.shapes_base.pretrain import ensure_base
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path))
    cfg = load_base_config(TINY_BASE_CONFIG, [*TINY_BASE, "seed=5"])
    with torch.inference_mode():
        path = ensure_base(cfg, log=lambda *a: None)
        assert not torch.is_grad_enabled()
    assert (path / "model_index.json").is_file() and path.parent == tmp_path / "base"
