"""``imagereward`` on a tiny checkpoint in the published format (ImageReward.pt's key names and tensor layouts, tiny
widths and depths) and a tiny BERT tokenizer written from a vocabulary file: every key converts, the score equals
ImageReward's forward pass written out below in plain torch on the raw checkpoint tensors, and a missing, garbage
or foreign file is refused in one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgpo.errors import UserError
from dgpo.rewards.image_reward import (NOT_IN_CHECKPOINT, UNMAPPED_KEYS, ImageReward, blip_config, blip_from_state, blip_key,
                               blip_state_dict)
from dgpo.rewards import make_reward, reward_of_run

#: ImageReward.pt's keys, derived from the published module definitions (THUDM/ImageReward: ``ImageReward`` holds
#: ``blip`` = ``BLIP_Pretrain(vit='large', image_size=224)`` and ``mlp`` = ``MLP(768)``; BLIP's timm-style
#: ``VisionTransformer`` as ``blip.visual_encoder``, its "med" ``BertModel(add_pooling_layer=False)`` with
#: cross-attention in every layer as ``blip.text_encoder``, and ``blip.vision_proj``, ``blip.text_proj``).
#: {i}: a ViT block, {j}: a BERT layer. Shapes in symbols: Dv, Iv the ViT's width and MLP width, P the patch, N
#: the positions (grid² + 1); Dt, It, V, L BERT's width, intermediate width, vocabulary and positions; E the
#: projections' width. ``position_ids`` is the (persistent) buffer of the med BertEmbeddings, an int64 arange.
PUBLISHED_KEYS = (
    ("blip.visual_encoder.cls_token", (1, 1, "Dv")),
    ("blip.visual_encoder.pos_embed", (1, "N", "Dv")),
    ("blip.visual_encoder.patch_embed.proj.weight", ("Dv", 3, "P", "P")),
    ("blip.visual_encoder.patch_embed.proj.bias", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.norm1.weight", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.norm1.bias", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.weight", ("3Dv", "Dv")),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.bias", ("3Dv",)),
    ("blip.visual_encoder.blocks.{i}.attn.proj.weight", ("Dv", "Dv")),
    ("blip.visual_encoder.blocks.{i}.attn.proj.bias", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.norm2.weight", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.norm2.bias", ("Dv",)),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.weight", ("Iv", "Dv")),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.bias", ("Iv",)),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.weight", ("Dv", "Iv")),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.bias", ("Dv",)),
    ("blip.visual_encoder.norm.weight", ("Dv",)),
    ("blip.visual_encoder.norm.bias", ("Dv",)),
    ("blip.text_encoder.embeddings.position_ids", (1, "L")),
    ("blip.text_encoder.embeddings.word_embeddings.weight", ("V", "Dt")),
    ("blip.text_encoder.embeddings.position_embeddings.weight", ("L", "Dt")),
    ("blip.text_encoder.embeddings.LayerNorm.weight", ("Dt",)),
    ("blip.text_encoder.embeddings.LayerNorm.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.query.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.query.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.key.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.key.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.value.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.attention.self.value.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.output.dense.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.attention.output.dense.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.output.LayerNorm.weight", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.attention.output.LayerNorm.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.query.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.query.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.key.weight", ("Dt", "Dv")),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.key.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.value.weight", ("Dt", "Dv")),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.self.value.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.output.dense.weight", ("Dt", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.output.dense.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.output.LayerNorm.weight", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.crossattention.output.LayerNorm.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.intermediate.dense.weight", ("It", "Dt")),
    ("blip.text_encoder.encoder.layer.{j}.intermediate.dense.bias", ("It",)),
    ("blip.text_encoder.encoder.layer.{j}.output.dense.weight", ("Dt", "It")),
    ("blip.text_encoder.encoder.layer.{j}.output.dense.bias", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.output.LayerNorm.weight", ("Dt",)),
    ("blip.text_encoder.encoder.layer.{j}.output.LayerNorm.bias", ("Dt",)),
    ("blip.vision_proj.weight", ("E", "Dv")),
    ("blip.vision_proj.bias", ("E",)),
    ("blip.text_proj.weight", ("E", "Dt")),
    ("blip.text_proj.bias", ("E",)),
    ("mlp.layers.0.weight", (1024, "Dt")),
    ("mlp.layers.0.bias", (1024,)),
    ("mlp.layers.2.weight", (128, 1024)),
    ("mlp.layers.2.bias", (128,)),
    ("mlp.layers.4.weight", (64, 128)),
    ("mlp.layers.4.bias", (64,)),
    ("mlp.layers.6.weight", (16, 64)),
    ("mlp.layers.6.bias", (16,)),
    ("mlp.layers.7.weight", (1, 16)),
    ("mlp.layers.7.bias", (1,)),
)
#: The published sizes: ViT-L/16 at 224 px (24 blocks, 16 heads), BERT-base (12 layers, 12 heads) with BLIP's
#: 30522 + 2 tokens and 512 positions, 256-wide projections.
PUBLISHED_DIMS = dict(Dv=1024, Iv=4096, P=16, N=197, blocks=24, Dt=768, It=3072, V=30524, L=512, layers=12, E=256)
#: The tiny test model: 3 and 2 heads of 64, 32 px images of 8 px patches.
TINY_DIMS = dict(Dv=192, Iv=768, P=8, N=17, blocks=2, Dt=128, It=256, L=40, layers=2, E=16)
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.mean, ImageReward.std
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "on", "the",
         "left", "right", "and", "two", "three", "big", "small", "##s", "##es", ",", "."]
PROMPTS = ["A photo of a red circle", "two blue squares on the left of three small green triangles, and a big "
           "red dog on the right of a small cat and two dogs and a photo of the blue circle .", "",
           "a cat [ENC] and a dog [DEC]"]


def published_keys(dims: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} of :data:`PUBLISHED_KEYS` at ``dims``."""
    sizes = {**dims, "3Dv": 3 * dims["Dv"]}
    out = {}
    for pattern, shape in PUBLISHED_KEYS:
        count = dims["blocks"] if "{i}" in pattern else dims["layers"] if "{j}" in pattern else 1
        for n in range(count):
            out[pattern.format(i=n, j=n)] = tuple(sizes.get(s, s) for s in shape)
    return out


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` whose scale keeps every layer's activations around 1 (so that a wrong conversion changes
    the score visibly): layer-norm gains near 1, weights 1/√fan-in, embeddings of order 1, small biases."""
    if key.endswith("position_ids"):
        return torch.arange(shape[1]).expand(1, -1).clone()
    if key.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.1
    if "norm" in key.lower():
        return 1 + torch.randn(shape, generator=g) * 0.1
    if len(shape) == 2 and "embeddings" not in key:
        return torch.randn(shape, generator=g) / shape[1] ** 0.5
    if len(shape) == 4:
        return torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
    return torch.randn(shape, generator=g) * 0.5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer folder as bert-base-uncased's is laid out: vocab.txt and tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 512}')
    return folder


@pytest.fixture(scope="module")
def state(tokenizer_dir):
    """A random ImageReward state dict with the published keys and layouts at :data:`TINY_DIMS`."""
    g = torch.Generator().manual_seed(0)
    vocab = len((tokenizer_dir / "vocab.txt").read_text().split()) + 2  # BLIP's [DEC] and [ENC]
    return {k: random_tensor(k, shape, g) for k, shape in published_keys({**TINY_DIMS, "V": vocab}).items()}


@pytest.fixture(scope="module")
def checkpoint(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def images():
    """Smooth random images 40 × 64: resized to 32 × 51, so the centre crop starts at round(19 / 2) = 10."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((len(PROMPTS), 3, 5, 8), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(40, 64), mode="bilinear", align_corners=False)
    return (smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ------------------------------------------------------------------ ImageReward's forward pass, written out

def blip_tokenizer(folder):
    """bert-base-uncased as BLIP's ``init_tokenizer`` extends it."""
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def reference_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC) on a PIL image, CenterCrop(size), ToTensor, Normalize(CLIP)."""
    out = []
    for array in images:
        im = Image.fromarray(array)
        w, h = im.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize(new, Image.BICUBIC)
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        out.append(torch.tensor(np.asarray(im.crop((left, top, left + size, top + size))), dtype=torch.float32))
    x = torch.stack(out).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def lin(x, s, key):
    return x @ s[key + ".weight"].T + s[key + ".bias"]


def ln(x, s, key, eps):
    return F.layer_norm(x, x.shape[-1:], s[key + ".weight"], s[key + ".bias"], eps)


def attend(q, k, v, heads, bias=0.0):
    """Multi-head attention of (B, T, D) queries on (B, S, D) keys and values, heads of D / heads."""
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1)
    return (w @ v).transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


def reference_vit(s, x, heads):
    p = "blip.visual_encoder."
    conv = s[p + "patch_embed.proj.weight"]
    h = F.conv2d(x, conv, s[p + "patch_embed.proj.bias"], stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([s[p + "cls_token"].expand(len(x), -1, -1), h], dim=1) + s[p + "pos_embed"][:, :h.shape[1] + 1]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in s:
        b = f"{p}blocks.{i}."
        q, k, v = lin(ln(h, s, b + "norm1", 1e-6), s, b + "attn.qkv").chunk(3, dim=-1)
        h = h + lin(attend(q, k, v, heads), s, b + "attn.proj")
        h = h + lin(F.gelu(lin(ln(h, s, b + "norm2", 1e-6), s, b + "mlp.fc1")), s, b + "mlp.fc2")
        i += 1
    return ln(h, s, p + "norm", 1e-6)


def reference_text(s, ids, mask, image, heads):
    p = "blip.text_encoder."
    h = s[p + "embeddings.word_embeddings.weight"][ids] + s[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, s, p + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    j = 0
    while f"{p}encoder.layer.{j}.intermediate.dense.weight" in s:
        b = f"{p}encoder.layer.{j}."
        for part, keys, mask_bias in (("attention", h, bias), ("crossattention", image, 0.0)):
            a = attend(lin(h, s, b + part + ".self.query"), lin(keys, s, b + part + ".self.key"),
                       lin(keys, s, b + part + ".self.value"), heads, mask_bias)
            h = ln(lin(a, s, b + part + ".output.dense") + h, s, b + part + ".output.LayerNorm", 1e-12)
        f = F.gelu(lin(h, s, b + "intermediate.dense"))
        h = ln(lin(f, s, b + "output.dense") + h, s, b + "output.LayerNorm", 1e-12)
        j += 1
    return h


def reference_scores(s, images, prompts, tokenizer_folder):
    """ImageReward.score for each (image, prompt): ViT embeddings → BERT with cross-attention on the prompt padded
    to 35 tokens → the [CLS] feature → the MLP (linear layers) → (r − mean) / std."""
    v = "blip.visual_encoder."
    size = s[v + "patch_embed.proj.weight"].shape[-1] * round((s[v + "pos_embed"].shape[1] - 1) ** 0.5)
    tokens = blip_tokenizer(tokenizer_folder)(prompts, padding="max_length", truncation=True, max_length=35,
                                              return_tensors="pt")
    with torch.no_grad():
        image = reference_vit(s, reference_pixels(images, size), s["blip.visual_encoder.cls_token"].shape[-1] // 64)
        h = reference_text(s, tokens["input_ids"], tokens["attention_mask"], image,
                           s["blip.text_encoder.embeddings.word_embeddings.weight"].shape[1] // 64)[:, 0]
        for i in (0, 2, 4, 6, 7):
            h = lin(h, s, f"mlp.layers.{i}")
    return ((h.squeeze(-1) - MEAN) / STD).double().numpy()


# ------------------------------------------------------------------ tests

def test_every_checkpoint_key_converts(state):
    mapped = blip_state_dict(state)
    model = blip_from_state(state)
    theirs = model.state_dict()
    used = {k for k in state if k.startswith("blip.") and blip_key(k) is not None}
    assert len(used) == len(mapped)  # one checkpoint key per transformers weight
    assert set(state) == used | {k for k in state if k.startswith("mlp.")} | set(UNMAPPED_KEYS)
    assert set(theirs) == set(mapped) | set(NOT_IN_CHECKPOINT)  # nothing of transformers' left unset but itm_head
    for key in used:
        assert torch.equal(theirs[blip_key(key)], state[key]), key
    assert all((theirs[k] == 0).all() for k in NOT_IN_CHECKPOINT)


def test_the_published_sizes_convert(tokenizer_dir):
    """At full size (shapes only, on the meta device): the config read from the shapes builds a model whose every
    weight has the converted key's shape, with ViT-L/16's 224 px, 16 heads, and BERT-base's 12 heads."""
    from transformers import BlipForImageTextRetrieval
    state = {k: torch.empty(shape, device="meta") for k, shape in published_keys(PUBLISHED_DIMS).items()}
    assert len(state) == 4 + 2 + 24 * 12 + 5 + 12 * 26 + 4 + 10
    config = blip_config(state)
    assert (config.vision_config.image_size, config.vision_config.num_attention_heads) == (224, 16)
    assert (config.text_config.num_attention_heads, config.text_config.encoder_hidden_size) == (12, 1024)
    with torch.device("meta"):
        theirs = BlipForImageTextRetrieval(config).state_dict()
    mapped = blip_state_dict(state)
    assert set(theirs) == set(mapped) | set(NOT_IN_CHECKPOINT)
    assert all(theirs[k].shape == v.shape for k, v in mapped.items())


def test_the_prompt_is_tokenised_as_blip_extends_bert(checkpoint, tokenizer_dir):
    reward = ImageReward(f"{checkpoint},{tokenizer_dir}")
    words = len(WORDS) + 5
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [words, words + 1]
    from dgpo.rewards.image_reward import tokenize
    tokens = tokenize(reward.tokenizer, PROMPTS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (len(PROMPTS), 35)
    assert (ids[:, 0] == reward.tokenizer.cls_token_id).all()
    assert ids[1, -1] == reward.tokenizer.sep_token_id and mask[1].all()  # the long prompt is cut at 35
    assert mask[2].sum() == 2 and (ids[2, 2:] == 0).all()  # "": [CLS] [SEP], then padding
    assert words in ids[3].tolist() and words + 1 in ids[3].tolist()  # [DEC] and [ENC] stay whole
    assert ids[0, 1:7].tolist() == reward.tokenizer.convert_tokens_to_ids(["a", "photo", "of", "a", "red", "circle"])


def test_the_score_is_imagerewards_forward_pass(checkpoint, tokenizer_dir, state, images):
    reward = make_reward("imagereward", model=f"{checkpoint},{tokenizer_dir}")
    got = reward(images, PROMPTS)
    want = reference_scores(state, images, PROMPTS, tokenizer_dir)
    assert reward.name == "imagereward" and got.dtype == np.float64 and got.shape == (len(PROMPTS),)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want) > 0.1  # the scores differ: the comparison is not between constants
    flipped = reward(images[::-1].copy(), PROMPTS)  # the image matters
    assert np.abs(flipped - got).max() > 1e-3
    assert reward(images[:0], []).shape == (0,)


@pytest.mark.parametrize("mutation", ["swap q and k of a ViT qkv", "swap key and value of a cross-attention"])
def test_the_comparison_catches_a_wrong_conversion(mutation, state, tokenizer_dir, images, tmp_path):
    """A checkpoint converted with q and k (or key and value) exchanged scores visibly differently from the
    reference: the comparison above would catch such a conversion."""
    wrong = dict(state)
    if mutation.startswith("swap q"):
        for kind in ("weight", "bias"):
            q, k, v = state[f"blip.visual_encoder.blocks.1.attn.qkv.{kind}"].chunk(3)
            wrong[f"blip.visual_encoder.blocks.1.attn.qkv.{kind}"] = torch.cat([k, q, v])
    else:
        p = "blip.text_encoder.encoder.layer.0.crossattention.self."
        for kind in ("weight", "bias"):
            wrong[p + "key." + kind], wrong[p + "value." + kind] = state[p + "value." + kind], state[p + "key." + kind]
    torch.save(wrong, tmp_path / "wrong.pt")
    got = ImageReward(f"{tmp_path / 'wrong.pt'},{tokenizer_dir}")(images, PROMPTS)
    assert np.abs(got - reference_scores(state, images, PROMPTS, tokenizer_dir)).max() > 1e-3


def test_scores_are_differentiable_in_the_pixels(checkpoint, tokenizer_dir, images):
    reward = ImageReward(f"{checkpoint},{tokenizer_dir}")
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    scores = reward.score(pixels, PROMPTS)
    scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    # torch's and PIL's bicubic resampling (and PIL's rounding to uint8) differ in the last bits
    np.testing.assert_allclose(scores.detach().numpy(), reward(images, PROMPTS), atol=0.05)


def test_a_run_passes_reward_model_to_the_reward(checkpoint, tokenizer_dir):
    from types import SimpleNamespace
    cfg = SimpleNamespace(name="imagereward", model=f"{checkpoint},{tokenizer_dir}", url="", timeout=1.0,
                          retries=0, batch_size=0)
    name, reward = reward_of_run(cfg, world=None)
    assert name == "imagereward" and isinstance(reward, ImageReward)


class Payload:  # an object a pickle would run code to rebuild
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_files_are_one_clear_line(state, checkpoint, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file" * 10)
    torch.save({"blip.visual_encoder.cls_token": Payload()}, tmp_path / "evil.pt")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "aesthetic.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"mlp.layers.0.weight": 1.5}, tmp_path / "number.pt")
    torch.save({**state, "blip.visual_encoder.head.weight": torch.zeros(2, 2)}, tmp_path / "extra.pt")
    torch.save({k: v for k, v in state.items() if "layer.1.crossattention.self.key" not in k}, tmp_path / "less.pt")
    torch.save({**state, "mlp.layers.8.weight": torch.zeros(1, 1)}, tmp_path / "head.pt")
    small = tmp_path / "small_bert"
    small.mkdir()
    (small / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {"": "needs its model on disk: --set reward.model=IMAGEREWARD_PT,BERT_TOKENIZER_DIR",
             str(checkpoint): "needs reward.model=IMAGEREWARD_PT,BERT_TOKENIZER_DIR",
             f"{tmp_path / 'missing.pt'},{tokenizer_dir}": "no checkpoint",
             f"{tmp_path / 'garbage.pt'},{tokenizer_dir}": "is not a plain state dict (UnpicklingError)",
             f"{tmp_path / 'evil.pt'},{tokenizer_dir}": "is not a plain state dict (UnpicklingError); nothing in it "
                                                       "was unpickled",
             f"{tmp_path / 'aesthetic.pth'},{tokenizer_dir}": "is not ImageReward's state dict",
             f"{tmp_path / 'list.pt'},{tokenizer_dir}": "is not a state dict of tensors (it holds a list)",
             f"{tmp_path / 'number.pt'},{tokenizer_dir}": "is not a state dict of tensors ('mlp.layers.0.weight': "
                                                         "float)",
             f"{tmp_path / 'extra.pt'},{tokenizer_dir}": "does not convert to ImageReward (KeyError: "
                                                        "'blip.visual_encoder.head.weight')",
             f"{tmp_path / 'less.pt'},{tokenizer_dir}": "does not convert to ImageReward (ValueError: missing "
                                                       "['text_encoder.encoder.layer.1.crossattention.self.key.bias'",
             f"{tmp_path / 'head.pt'},{tokenizer_dir}": "does not convert to ImageReward (RuntimeError",
             f"{checkpoint},{tmp_path / 'nowhere'}": "holds no BERT tokenizer",
             f"{checkpoint},{empty}": "holds no BERT tokenizer",
             f"{checkpoint},{small}": "has 8 tokens with BLIP's [DEC] and [ENC], the checkpoint embeds "
                                      f"{len(WORDS) + 7}"}
    for model, message in cases.items():
        with pytest.raises(UserError) as e:
            make_reward("imagereward", model=model)
        assert message in str(e.value) and "\n" not in str(e.value), (model, str(e.value))
    assert "unpickled!" not in capsys.readouterr().out
