"""CLIP-family rewards (clip_score, pickscore, aesthetic) on a tiny CLIP saved in the transformers layout and a
tiny head with the LAION aesthetic predictor's keys: the formulas, the preprocessing against
CLIPImageProcessor's, gradients through the pixels, and one clear line for a wrong or unsafe file."""

import numpy as np
import pytest
import torch

from dgpo.rewards.clip import AESTHETIC_HEAD_KEYS, CLIPReward, clip_pixels, projected
from dgpo.errors import UserError
from dgpo.rewards import make_reward, reward_of_run

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two triangles"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dgpo.models.tiny_pipelines import world_words
    from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
    folder = tmp_path_factory.mktemp("clip") / "clip"
    tok = build_clip_tokenizer(world_words(), 16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    """Smooth random images (noise at 6 × 8, upsampled): resamplers agree on them as on photographs."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((3, 3, 6, 8), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear", align_corners=False)
    return (smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def features(folder, images, prompts):
    """Unit image and text embeddings as a transformers user computes them (CLIPImageProcessor, CLIPModel)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    model = CLIPModel.from_pretrained(str(folder)).eval()
    pixels = CLIPImageProcessor.from_pretrained(str(folder))(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(str(folder))(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = torch.nn.functional.normalize(projected(model.get_image_features(pixel_values=pixels)), dim=-1)
        text = torch.nn.functional.normalize(projected(model.get_text_features(**tokens)), dim=-1)
    return model, pixels, image, text


def test_the_preprocessing_matches_clip_image_processor(clip_dir, images):
    _, theirs, _, _ = features(clip_dir, images, PROMPTS)
    ours = clip_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, 32, 32,
                       (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.05  # PIL's and torch's bicubic resampling differ in the last bits


def test_clip_score_and_pickscore_follow_their_formulas(clip_dir, images):
    model, _, image, text = features(clip_dir, images, PROMPTS)
    cos = (image * text).sum(-1)
    clip_score = make_reward("clip_score", model=str(clip_dir))(images, PROMPTS)
    pick = make_reward("pickscore", model=str(clip_dir))(images, PROMPTS)
    np.testing.assert_allclose(clip_score, (2.5 * cos.clamp(min=0)).numpy(), atol=0.02)
    np.testing.assert_allclose(pick, (model.logit_scale.exp() * cos).detach().numpy(), atol=0.5)
    assert clip_score.shape == pick.shape == (3,) and np.isfinite(pick).all()


def test_scores_are_differentiable_in_the_pixels(clip_dir, images):
    reward = CLIPReward("pickscore", str(clip_dir))
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    scores = reward.score(pixels, PROMPTS)
    scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    np.testing.assert_allclose(scores.detach().numpy(), reward(images, PROMPTS), rtol=1e-5, atol=1e-5)


def head_state(width=16):
    sizes = [(1024, width), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for (out, inp), i in zip(sizes, (0, 2, 4, 6, 7)):
        state[f"layers.{i}.weight"] = torch.randn(out, inp) * 0.05
        state[f"layers.{i}.bias"] = torch.randn(out) * 0.05
    assert tuple(state) == AESTHETIC_HEAD_KEYS  # the published predictor's key list
    return state


def test_the_aesthetic_head_scores_the_normalised_image_embedding(clip_dir, images, tmp_path):
    state = head_state()
    torch.save(state, tmp_path / "head.pth")
    got = make_reward("aesthetic", model=f"{clip_dir},{tmp_path / 'head.pth'}")(images, PROMPTS)
    x = clip_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, 32, 32,
                    (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    from transformers import CLIPModel
    with torch.no_grad():
        h = torch.nn.functional.normalize(projected(CLIPModel.from_pretrained(str(clip_dir)).get_image_features(pixel_values=x)),
                                        dim=-1)
        for i in (0, 2, 4, 6, 7):
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(got, h.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)


class Payload:  # an object a pickle would run code to rebuild
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_wrong_or_unsafe_files_are_one_clear_line(clip_dir, tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save({"layers.0.weight": Payload()}, tmp_path / "evil.pth")
    cases = {"": "needs its model on disk: --set reward.model=CLIP_DIR,HEAD.pth",
             str(clip_dir): "needs reward.model=CLIP_DIR,HEAD.pth",
             f"{clip_dir},{tmp_path / 'other.pth'}": "is not the LAION aesthetic predictor's state dict",
             f"{clip_dir},{tmp_path / 'evil.pth'}": "is not a plain state dict (UnpicklingError); nothing in it was unpickled",
             f"{tmp_path},{tmp_path / 'other.pth'}": "is not a transformers CLIP folder"}
    for model, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            make_reward("aesthetic", model=model)


def test_a_run_passes_reward_model_to_the_reward(clip_dir):
    from types import SimpleNamespace
    cfg = SimpleNamespace(name="clip_score", model=str(clip_dir), url="", timeout=1.0, retries=0, batch_size=0)
    name, reward = reward_of_run(cfg, world=None)
    assert name == "clip_score" and isinstance(reward, CLIPReward) and reward.kind == "clip_score"


# ------------------------------------------------------------------------------------------ HPSv2 (open_clip)

def open_clip_state(vocab: int, width=128, layers=2, patch=8, grid=4, context=16, embed=64, seed=0):
    """A random state dict with open_clip's CLIP key names and layout (as HPSv2's checkpoint holds it)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
             "visual.positional_embedding": r(grid * grid + 1, width), "visual.proj": r(width, embed),
             "token_embedding.weight": r(vocab, width), "positional_embedding": r(context, width),
             "text_projection": r(width, embed), "logit_scale": torch.tensor(4.6)}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        state[f"{ln}.weight"], state[f"{ln}.bias"] = 1 + r(width), r(width)
    for tower in ("visual.transformer", "transformer"):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            state.update({p + "attn.in_proj_weight": r(3 * width, width, s=0.1), p + "attn.in_proj_bias": r(3 * width),
                          p + "attn.out_proj.weight": r(width, width, s=0.1), p + "attn.out_proj.bias": r(width),
                          p + "mlp.c_fc.weight": r(4 * width, width, s=0.1), p + "mlp.c_fc.bias": r(4 * width),
                          p + "mlp.c_proj.weight": r(width, 4 * width, s=0.1), p + "mlp.c_proj.bias": r(width)})
            for ln in ("ln_1", "ln_2"):
                state[f"{p}{ln}.weight"], state[f"{p}{ln}.bias"] = 1 + r(width), r(width)
    return state


def open_clip_forward(state, pixels, tokens, eos: int, heads: int = 2):
    """open_clip's CLIP forward written from its definition (an oracle independent of the conversion): unit
    image and text embeddings."""
    F = torch.nn.functional

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)

    def blocks(x, tower, mask=None):
        i = 0
        while f"{tower}.resblocks.{i}.ln_1.weight" in state:
            p = f"{tower}.resblocks.{i}."
            h = ln(x, p + "ln_1").transpose(0, 1)  # (L, B, E)
            a, _ = F.multi_head_attention_forward(
                h, h, h, h.shape[-1], heads, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"], None,
                None, False, 0.0, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"], training=False,
                need_weights=False, attn_mask=mask)
            x = x + a.transpose(0, 1)
            h = F.gelu(F.linear(ln(x, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
            i += 1
        return x

    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=state["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + state["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre"), "visual.transformer")
    image = ln(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    n = tokens.shape[1]
    t = state["token_embedding.weight"][tokens] + state["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    t = ln(blocks(t, "transformer", causal), "ln_final")
    text = t[torch.arange(len(t)), (tokens == eos).int().argmax(1)] @ state["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_hpsv2_converts_open_clip_and_scores_the_cosine(clip_dir, images, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    state = open_clip_state(vocab=len(tok))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "hps.pt")  # as published
    got = make_reward("hpsv2", model=f"{tmp_path / 'hps.pt'},{clip_dir}")(images, PROMPTS)
    pixels = clip_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, 32, 32,
                         (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    tokens = torch.tensor([i + [tok.pad_token_id] * (16 - len(i)) for i in ids])
    with torch.no_grad():
        image, text = open_clip_forward(state, pixels, tokens, tok.eos_token_id)
    np.testing.assert_allclose(got, (image * text).sum(-1).numpy(), atol=1e-4)
    assert got.std() > 1e-3  # three different pairs, three different scores
