"""Named adapter roles on one backbone: switching, the reference, gradients, state by peft name, export."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from dgpo.models.adapters import AdapterRoles


def _backbone():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 3, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([500.0, 250.0]))


def _out(tr):
    with torch.no_grad():
        return tr(**_inputs()).sample


@pytest.fixture
def roles():
    tr = _backbone()
    base = _out(tr)
    r = AdapterRoles(tr)
    for i, name in enumerate(("policy", "fake", "surrogate")):
        r.add(name, rank=2, seed=i)
    return r, base


def test_fresh_roles_equal_the_reference_and_each_role_is_its_own_model(roles):
    r, base = roles
    for name in r.names:
        with r.active(name):
            assert torch.allclose(_out(r.transformer), base, atol=1e-6)  # LoRA B = 0
    with torch.no_grad():
        for p in r.parameters("fake"):
            p.add_(0.05 * torch.randn_like(p))
    with r.active("fake"):
        fake = _out(r.transformer)
    assert (fake - base).abs().max() > 1e-3
    for name in ("policy", "surrogate"):
        with r.active(name):
            assert torch.allclose(_out(r.transformer), base, atol=1e-6)
    with r.active("fake"), r.reference():
        assert torch.allclose(_out(r.transformer), base, atol=1e-6)


def test_gradients_reach_only_the_live_role_and_every_role_stays_trainable(roles):
    r, _ = roles
    with torch.no_grad():
        for p in r.parameters("surrogate"):
            p.add_(0.05 * torch.randn_like(p))
    with r.active("surrogate"):
        r.transformer(**_inputs()).sample.square().mean().backward()
    grads = [p.grad for p in r.parameters("surrogate")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    for name in ("policy", "fake"):
        assert all(p.grad is None for p in r.parameters(name)), name
    assert all(p.requires_grad for name in r.names for p in r.parameters(name))
    assert not any(p.requires_grad for n, p in r.transformer.named_parameters() if "lora_" not in n)


def test_state_is_keyed_by_peft_name_and_loads_back(roles):
    r, _ = roles
    with torch.no_grad():
        for p in r.parameters("policy"):
            p.add_(torch.randn_like(p))
    state = r.state("policy")
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state)
    assert not any("policy" in k for k in state)
    r.load("surrogate", state)  # a role's weights move to another role by name
    for a, b in zip(r.parameters("policy"), r.parameters("surrogate")):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="keys the model does not"):
        r.load("fake", {"transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(2, 16)})
    with pytest.raises(KeyError, match="no adapter role 'student'"):
        r.parameters("student")
    with pytest.raises(ValueError, match="exists already"):
        r.add("fake", rank=2)


def test_active_restores_the_previous_role(roles):
    r, _ = roles
    with r.active("policy"):
        with r.active("fake"):
            assert r.transformer.active_adapters() == ["fake"]
        assert r.transformer.active_adapters() == ["policy"]


@pytest.mark.parametrize("rank, alpha", [(2, 2.0), (2, 8.0)])
def test_exported_role_reproduces_itself_in_stock_diffusers(tiny_base, tmp_path, rank, alpha):
    """The diffusers LoRA of a role loads with `load_lora_weights` and gives the role's outputs — also when
    alpha ≠ rank (the scale α/r must travel with the weights)."""
    from diffusers import StableDiffusion3Pipeline
    ours = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    r = AdapterRoles(ours.transformer)
    with torch.no_grad():
        for p in r.add("student", rank=rank, alpha=alpha, seed=3):
            p.add_(0.1 * torch.randn_like(p))
    r.save_diffusers("student", tmp_path / "lora")
    stock = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(tmp_path / "lora"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, ours.transformer.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, ours.transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, ours.transformer.config.pooled_projection_dim, generator=g)
    t = torch.tensor([500.0, 250.0])
    with torch.no_grad(), r.active("student"):
        a = ours.transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    with torch.no_grad():
        b = stock.transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
