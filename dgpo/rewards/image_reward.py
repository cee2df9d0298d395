"""``imagereward``: ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), read from its published checkpoint on a local path (nothing is downloaded).

The score of an image x for a prompt p is

    r(x, p) = (MLP(h_CLS(p | ViT(x))) − μ) / σ,      μ = 0.16717362830052426,  σ = 1.0333394966054072,

where ViT(x) are the last-layer token embeddings of BLIP's ViT-L/16 (224 px) vision encoder, h_CLS is the
first-position output of BLIP's BERT-base text encoder run on the tokenised prompt with cross-attention to ViT(x)
in every layer, and the MLP is 768 → 1024 → 128 → 64 → 16 → 1, linear layers only (the published head has no
activations; its dropouts are off in eval mode). The prompt is tokenised by bert-base-uncased extended as BLIP
extends it ([DEC] as the bos token, [ENC] as an extra special token), truncated and padded to 35 tokens.

``ImageReward.pt`` is a plain state dict of ImageReward's module: ``blip.visual_encoder.*`` (timm-style ViT),
``blip.text_encoder.*`` (BLIP's "med" BERT), ``blip.vision_proj.*``, ``blip.text_proj.*`` and ``mlp.layers.*``.
It is read with ``torch.load(weights_only=True)`` (never unpickled as objects) and converted key by key into
transformers' ``BlipForImageTextRetrieval`` (:func:`blip_key`); the head becomes a small ``torch.nn.Sequential``.
``reward.model`` = "IMAGEREWARD_PT,BERT_TOKENIZER_DIR" (a local bert-base-uncased tokenizer folder).

Images are preprocessed as ImageReward does for a PIL image: the shortest side resized bicubically (PIL) to the
encoder's size, centre crop, CLIP's mean and std. ``reward(images, prompts)`` does exactly that (uint8 in, floats
out); ``reward.score(pixels, prompts)`` (float (B, 3, H, W) in [0, 1]) resizes in torch instead, so that the score
is differentiable in the pixels, for methods that back-propagate a reward.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dgpo.rewards.clip import CLIP_MEAN, CLIP_STD, clip_pixels, normalise
from dgpo.errors import UserError

#: ImageReward's normalisation of the head's output: (r − mean) / std.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
#: The prompt's length in tokens: truncated and padded to it.
PROMPT_TOKENS = 35
#: The attention heads' width in both encoders (ViT-L/16: 1024 wide, 16 heads; BERT-base: 768 wide, 12 heads).
#: Head counts are not in a state dict; these are the published models'.
HEAD_WIDTH = 64
#: Layer-norm epsilons of the published modules: the ViT's (timm, 1e-6) and BERT's (1e-12).
VISION_LN_EPS, TEXT_LN_EPS = 1e-6, 1e-12
#: The special tokens BLIP adds to bert-base-uncased, in this order: the bos token, then one extra special token.
BLIP_BOS_TOKEN, BLIP_ENC_TOKEN = "[DEC]", "[ENC]"
#: The head's state-dict keys (an ``nn.Sequential``: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear).
HEAD_LINEARS = (0, 2, 4, 6, 7)
HEAD_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
#: Checkpoint entries that are not weights: the text embeddings' position-id buffer (0, 1, 2, …), which
#: transformers rebuilds itself.
UNMAPPED_KEYS = ("blip.text_encoder.embeddings.position_ids",)
#: transformers weights that ImageReward does not have: the retrieval model's image–text matching head (zeroed,
#: never used by the score).
NOT_IN_CHECKPOINT = ("itm_head.weight", "itm_head.bias")

#: The ViT's names → transformers' ``BlipVisionModel`` names (outside the blocks, and inside block i).
VISION_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
VISION_BLOCK_NAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                      "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def blip_key(key: str) -> str | None:
    """The transformers ``BlipForImageTextRetrieval`` name of one ImageReward ``blip.*`` key; None for a buffer
    transformers rebuilds (:data:`UNMAPPED_KEYS`); ``KeyError`` for a name ImageReward's BLIP does not have.

    The ViT's fused ``attn.qkv`` stays fused: transformers' BLIP attention reads it in the same layout (rows: all
    heads' queries, then keys, then values). BLIP's text encoder is the module transformers' ``BlipTextModel``
    was ported from, so its names carry over unchanged."""
    if key in UNMAPPED_KEYS:
        return None
    for ours, theirs in (("blip.text_encoder.", "text_encoder."), ("blip.vision_proj.", "vision_proj."),
                         ("blip.text_proj.", "text_proj.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder."):]
        if rest in VISION_NAMES:
            return "vision_model." + VISION_NAMES[rest]
        block = _BLOCK.fullmatch(rest)
        if block and block.group(2) in VISION_BLOCK_NAMES:
            i, part, kind = block.groups()
            return f"vision_model.encoder.layers.{i}.{VISION_BLOCK_NAMES[part]}.{kind}"
    raise KeyError(key)


def blip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``blip.*`` tensors of an ImageReward state dict under transformers' names (:func:`blip_key`); the head's
    ``mlp.*`` are left to :func:`reward_head`; ``KeyError`` for a key of neither."""
    out = {}
    for key, value in state.items():
        if key.startswith("mlp."):
            continue
        name = blip_key(key)
        if name is not None:
            out[name] = value
    return out


def _count(state: dict, prefix: str) -> int:
    """How many numbered sub-modules ``prefix{i}.…`` the state dict holds."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def blip_config(state: dict[str, torch.Tensor]):
    """A ``BlipConfig`` whose shapes are the checkpoint's: widths, depths, patch and image size, vocabulary and
    positions are read from the tensors; heads are :data:`HEAD_WIDTH` wide; epsilons are the published modules'."""
    from transformers import BlipConfig
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    patch = state[v + "patch_embed.proj.weight"]
    grid = round((state[v + "pos_embed"].shape[1] - 1) ** 0.5)
    v_width, t_width = patch.shape[0], state[t + "embeddings.word_embeddings.weight"].shape[1]
    vision = dict(hidden_size=v_width, intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_count(state, v + "blocks."), num_attention_heads=v_width // HEAD_WIDTH,
                  image_size=patch.shape[-1] * grid, patch_size=patch.shape[-1], hidden_act="gelu",
                  layer_norm_eps=VISION_LN_EPS)
    text = dict(vocab_size=state[t + "embeddings.word_embeddings.weight"].shape[0], hidden_size=t_width,
                encoder_hidden_size=state[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                intermediate_size=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                num_hidden_layers=_count(state, t + "encoder.layer."), num_attention_heads=t_width // HEAD_WIDTH,
                max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0],
                hidden_act="gelu", layer_norm_eps=TEXT_LN_EPS, is_decoder=True,  # is_decoder: build cross-attention
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                bos_token_id=None, eos_token_id=None, sep_token_id=None)  # used by decoding only
    return BlipConfig(vision_config=vision, text_config=text,
                      image_text_hidden_size=state["blip.vision_proj.weight"].shape[0])


def blip_from_state(state: dict[str, torch.Tensor]):
    """transformers' ``BlipForImageTextRetrieval`` holding the checkpoint's BLIP weights, frozen, eval mode;
    ``ValueError`` naming the first keys when the checkpoint misses weights or has ones BLIP does not."""
    from transformers import BlipForImageTextRetrieval
    from transformers.initialization import no_init_weights
    with no_init_weights():  # every weight is overwritten below
        model = BlipForImageTextRetrieval(blip_config(state))
    missing, unexpected = model.load_state_dict(blip_state_dict(state), strict=False)
    missing = sorted(set(missing) - set(NOT_IN_CHECKPOINT))
    if missing or unexpected:
        raise ValueError(f"missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name in NOT_IN_CHECKPOINT:
            model.get_parameter(name).zero_()
    return model.eval().requires_grad_(False)


def reward_head(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """ImageReward's MLP (``mlp.layers.*``) as an ``nn.Sequential`` with the published layout, frozen, eval mode."""
    weights = [state[f"mlp.layers.{i}.weight"] for i in HEAD_LINEARS]
    layers: list[torch.nn.Module] = []
    for i in range(HEAD_LINEARS[-1] + 1):
        if i in HEAD_DROPOUTS:
            layers.append(torch.nn.Dropout(HEAD_DROPOUTS[i]))
        else:
            out_width, in_width = weights[HEAD_LINEARS.index(i)].shape
            layers.append(torch.nn.Linear(in_width, out_width))
    head = torch.nn.Sequential(*layers)
    head.load_state_dict({k[len("mlp.layers."):]: v for k, v in state.items() if k.startswith("mlp.")})
    return head.eval().requires_grad_(False)


def read_checkpoint(path: str, name: str = "imagereward") -> dict[str, torch.Tensor]:
    """ImageReward's state dict from ``path`` (float32), or a ``UserError`` saying why it is not one."""
    from dgpo.models.weights_file import load_weights_only
    state = load_weights_only(path, f"reward {name!r}", "checkpoint (ImageReward.pt, the published state dict)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"reward {name!r}: {path!r} is not a state dict of tensors (it holds a {type(state).__name__})")
    odd = [f"{k!r}: {type(v).__name__}" for k, v in state.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise UserError(f"reward {name!r}: {path!r} is not a state dict of tensors ({odd[0]})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    needed = ("blip.visual_encoder.patch_embed.proj.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
              "mlp.layers.0.weight")
    if not all(k in state for k in needed):
        raise UserError(f"reward {name!r}: {path!r} is not ImageReward's state dict (keys {sorted(state)[:3]}…, "
                        f"expected {list(needed)})")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_tokenizer(folder: str, vocab_rows: int, name: str = "imagereward"):
    """bert-base-uncased from a local folder, extended as BLIP extends it ([DEC] as bos, [ENC] as an extra special
    token); ``UserError`` unless the result has as many tokens as the checkpoint's word embeddings."""
    from transformers import BertTokenizer
    path = Path(folder)
    if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
        raise UserError(f"reward {name!r}: {folder!r} holds no BERT tokenizer (vocab.txt or tokenizer.json of "
                        "bert-base-uncased)")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"reward {name!r}: {folder!r} could not be loaded as a BERT tokenizer ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    tokenizer.add_special_tokens({"bos_token": BLIP_BOS_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [BLIP_ENC_TOKEN]})
    if len(tokenizer) != vocab_rows:
        raise UserError(f"reward {name!r}: the tokenizer in {folder!r} has {len(tokenizer)} tokens with BLIP's "
                        f"[DEC] and [ENC], the checkpoint embeds {vocab_rows} (pass bert-base-uncased's tokenizer)")
    return tokenizer


def tokenize(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Input ids and attention mask (B, :data:`PROMPT_TOKENS`) as ImageReward tokenises: truncated, padded to the
    full length."""
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                       return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest side ``size`` and the other one ``int(size · long / short)`` (torchvision's
    ``Resize(size)`` rule, which ImageReward's preprocessing uses)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_origin(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(crop)``: round((side − crop) / 2)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) → the vision encoder's input (N, 3, size, size), exactly as ImageReward preprocesses a PIL
    image: PIL bicubic resize of the shortest side, centre crop, /255, CLIP normalisation."""
    out = []
    for image in images:
        h, w = image.shape[:2]
        new_h, new_w = resized_size(h, w, size)
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BICUBIC)
        top, left = crop_origin(new_h, new_w, size)
        out.append(np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255.0
    return normalise(x, CLIP_MEAN, CLIP_STD)


def preprocess_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] → the vision encoder's input: as :func:`preprocess`, with torch's antialiased
    bicubic resampling in place of PIL's. Differentiable."""
    return clip_pixels(pixels, size, size, CLIP_MEAN, CLIP_STD, round_crop=True)


class ImageReward:
    """``imagereward``: ImageReward's score of each (image, prompt) (see the module docstring)."""

    NEEDS = "IMAGEREWARD_PT,BERT_TOKENIZER_DIR"

    def __init__(self, model: str, batch_size: int = 32):
        self.name = "imagereward"
        self.batch_size = batch_size
        if not model:
            raise UserError(f"reward {self.name!r} needs its model on disk: --set reward.model={self.NEEDS}")
        checkpoint, _, tokenizer_dir = model.partition(",")
        if not tokenizer_dir:
            raise UserError(f"reward {self.name!r} needs reward.model={self.NEEDS}")
        state = read_checkpoint(checkpoint, self.name)
        vocab_rows = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0]
        self.tokenizer = load_tokenizer(tokenizer_dir, vocab_rows, self.name)  # before the slow conversion
        try:
            self.blip = blip_from_state(state)
            self.head = reward_head(state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"reward {self.name!r}: {checkpoint!r} does not convert to ImageReward "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
        self.size = self.blip.config.vision_config.image_size

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from dgpo.rewards.protocol import check_batch
        images, prompts = check_batch(images, prompts, f"{self.name} reward")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = preprocess(images[i:i + self.batch_size], self.size)
                out.append(self.score_preprocessed(x, prompts[i:i + self.batch_size]))
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable scores (B,) of float pixels (B, 3, H, W) in [0, 1]."""
        return self.score_preprocessed(preprocess_pixels(pixels, self.size), prompts)

    def score_preprocessed(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of the vision encoder's input x: (MLP(h_CLS) − mean) / std."""
        device = next(self.blip.parameters()).device
        image = self.blip.vision_model(pixel_values=x.to(device)).last_hidden_state
        tokens = {k: v.to(device) for k, v in tokenize(self.tokenizer, prompts).items()}
        text = self.blip.text_encoder(**tokens, encoder_hidden_states=image,
                                      encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                                        device=device))
        r = self.head.to(device)(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
