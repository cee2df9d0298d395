"""Rewards that are CLIP models, read from local paths in their published formats (nothing is downloaded):

- ``clip_score``: CLIPScore (Hessel et al. 2021, Eq. 1): 2.5 · max(cos(E_I(x), E_T(p)), 0), with a
  transformers CLIP folder (e.g. openai/clip-vit-large-patch14 as saved by ``save_pretrained``);
- ``pickscore``: PickScore (Kirstain et al. 2023): the learned logit scale · cos(E_I(x), E_T(p)) of the
  PickScore_v1 CLIP-H folder (a transformers ``CLIPModel``); it ranks images of one prompt (about 18–23);
- ``hpsv2``: HPSv2 (Wu et al. 2023): cos(E_I(x), E_T(p)) of its fine-tuned open_clip ViT-H-14, read from the
  published checkpoint (``HPS_v2.1_compressed.pt``: open_clip's state dict, with ``torch.load(weights_only=True)``)
  and converted into transformers' ``CLIPModel``, since open_clip itself cannot be imported with this torch; its
  tokenizer is CLIP's BPE, read from any CLIP folder: ``reward.model`` = "CHECKPOINT.pt,CLIP_TOKENIZER_DIR";
- ``aesthetic``: the LAION aesthetic predictor v2: an MLP (768 → 1024 → 128 → 64 → 16 → 1) on the
  normalised CLIP ViT-L/14 image embedding, predicting a 1–10 rating; ``reward.model`` = "CLIP_DIR,HEAD.pth",
  the head's state dict read with ``torch.load(weights_only=True)`` (never unpickled as objects).

Images are preprocessed as ``CLIPImageProcessor`` does (shortest side resized bicubically to ``size``, centre
crop, mean/std from the folder's ``preprocessor_config.json``) but in torch, so that :meth:`CLIPReward.score`
is differentiable in the pixels: ``reward(images, prompts)`` for RL (uint8 in, floats out) and
``reward.score(pixels, prompts)`` (float (B, 3, H, W) in [0, 1], a tensor with gradients) for methods that
back-propagate a reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dgpo.errors import UserError

#: CLIP's pixel statistics, when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The LAION aesthetic predictor v2's state-dict keys (the published sac+logos+ava1-l14-linearMSE.pth).
AESTHETIC_HEAD_KEYS = ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight",
                       "layers.4.bias", "layers.6.weight", "layers.6.bias", "layers.7.weight", "layers.7.bias")


def load_clip_folder(folder: str | Path, name: str):
    """(CLIPModel, tokenizer, preprocessing settings) of a local transformers CLIP folder, frozen, eval mode."""
    from transformers import AutoTokenizer, CLIPModel
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"reward {name!r}: {str(path)!r} is not a transformers CLIP folder (no config.json); pass "
                        f"the folder `CLIPModel.save_pretrained` wrote with reward.model=PATH")
    try:
        model = CLIPModel.from_pretrained(str(path)).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"reward {name!r}: {str(path)!r} could not be loaded ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    settings = {"size": model.config.vision_config.image_size, "crop": model.config.vision_config.image_size,
                "mean": CLIP_MEAN, "std": CLIP_STD}
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        cfg = json.loads(processor.read_text())
        size = cfg.get("size", settings["size"])
        crop = cfg.get("crop_size", settings["crop"])
        settings.update(size=size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size,
                        crop=crop.get("height") if isinstance(crop, dict) else crop,
                        mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)))
    return model, tokenizer, settings


def clip_pixels(pixels: torch.Tensor, size: int, crop: int, mean, std, round_crop: bool = False) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] → CLIP's input: shortest side to ``size`` (bicubic, antialiased), centre
    ``crop``, normalised. Differentiable. The crop starts at ⌊(side − crop) / 2⌋ as CLIPImageProcessor crops,
    or with ``round_crop`` at round((side − crop) / 2) as torchvision's CenterCrop does."""
    h, w = pixels.shape[-2:]
    short, long = min(h, w), max(h, w)
    other = int(size * long / short)  # as CLIPImageProcessor (and torchvision's Resize) rounds the long side
    out = (size, other) if h <= w else (other, size)
    resized = torch.nn.functional.interpolate(pixels, size=out, mode="bicubic", align_corners=False, antialias=True)
    margins = (resized.shape[-2] - crop, resized.shape[-1] - crop)
    top, left = (int(round(m / 2.0)) for m in margins) if round_crop else (m // 2 for m in margins)
    return normalise(resized[..., top:top + crop, left:left + crop], mean, std)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (x − mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class CLIPReward:
    """``clip_score``, ``pickscore``, ``hpsv2`` (text–image) and ``aesthetic`` (image only) over a local CLIP
    (see the module docstring)."""

    NEEDS = {"clip_score": "CLIP_DIR", "pickscore": "PICKSCORE_DIR", "aesthetic": "CLIP_DIR,HEAD.pth",
             "hpsv2": "CHECKPOINT.pt,CLIP_TOKENIZER_DIR"}

    def __init__(self, kind: str, model: str, batch_size: int = 64):
        if kind not in self.NEEDS:
            raise ValueError(f"unknown CLIP reward {kind!r}")
        if not model:
            raise UserError(f"reward {kind!r} needs its model on disk: --set reward.model={self.NEEDS[kind]}")
        self.name, self.kind, self.batch_size = kind, kind, batch_size
        first, _, second = model.partition(",")
        if kind in ("aesthetic", "hpsv2") and not second:
            raise UserError(f"reward {kind!r} needs reward.model={self.NEEDS[kind]}")
        if kind == "hpsv2":
            self.clip, self.tokenizer, self.settings = load_open_clip_checkpoint(first, second, kind)
        else:
            self.clip, self.tokenizer, self.settings = load_clip_folder(first, kind)
        self.head = load_aesthetic_head(second, self.clip.config.projection_dim) if kind == "aesthetic" else None

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from dgpo.rewards.protocol import check_batch
        images, prompts = check_batch(images, prompts, f"{self.name} reward")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                pixels = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
                out.append(self.score(pixels.float() / 255.0, prompts[i:i + self.batch_size]))
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable scores (B,) of float pixels (B, 3, H, W) in [0, 1]."""
        device = next(self.clip.parameters()).device
        x = clip_pixels(pixels.to(device), **self.settings)
        image = torch.nn.functional.normalize(projected(self.clip.get_image_features(pixel_values=x)), dim=-1)
        if self.kind == "aesthetic":
            return self.head(image).squeeze(-1)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        text = torch.nn.functional.normalize(projected(self.clip.get_text_features(**tokens)), dim=-1)
        cos = (image * text).sum(-1)
        if self.kind == "clip_score":
            return 2.5 * cos.clamp(min=0)
        if self.kind == "hpsv2":
            return cos
        return self.clip.logit_scale.exp() * cos


def projected(features) -> torch.Tensor:
    """CLIP's projected embedding from ``get_image_features`` / ``get_text_features``: a tensor in transformers 4,
    the output's ``pooler_output`` in transformers 5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_aesthetic_head(path: str, width: int) -> torch.nn.Sequential:
    """The LAION aesthetic predictor v2's MLP from its state dict (``torch.load(weights_only=True)``)."""
    from dgpo.models.weights_file import load_weights_only
    state = load_weights_only(path, "reward 'aesthetic'", "head file (the predictor's .pth state dict)")
    if not isinstance(state, dict) or sorted(state) != sorted(AESTHETIC_HEAD_KEYS):
        keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"reward 'aesthetic': {path!r} is not the LAION aesthetic predictor's state dict (keys "
                        f"{keys}…, expected {list(AESTHETIC_HEAD_KEYS[:2])}…)")
    hidden = [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
    if state["layers.0.weight"].shape[1] != width:
        raise UserError(f"reward 'aesthetic': the head reads {state['layers.0.weight'].shape[1]}-wide embeddings, "
                        f"the CLIP folder makes {width}-wide ones (the predictor goes with CLIP ViT-L/14)")
    head = torch.nn.Sequential(torch.nn.Linear(width, hidden[0]), torch.nn.Dropout(0.2),
                               torch.nn.Linear(hidden[0], hidden[1]), torch.nn.Dropout(0.2),
                               torch.nn.Linear(hidden[1], hidden[2]), torch.nn.Dropout(0.1),
                               torch.nn.Linear(hidden[2], hidden[3]), torch.nn.Linear(hidden[3], 1))
    head.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
    return head.eval().requires_grad_(False)


#: open_clip's attention head width per vision tower width where it is not 64 (ViT-H-14: 1280 wide, 16 heads).
OPEN_CLIP_VISION_HEADS = {1280: 16}


def open_clip_to_transformers(state: dict[str, torch.Tensor], tokenizer):
    """An open_clip CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``, …) as a transformers
    ``CLIPModel``: the architecture read from the tensors' shapes (heads: 64 wide, ViT-H's 80), the fused
    attention projections split into q, k, v, the projections transposed. The text is pooled at the
    ``tokenizer``'s end token, where open_clip pools at the largest token id: the same token in CLIP's BPE."""
    from transformers import CLIPConfig, CLIPModel

    def layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    v_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = state["token_embedding.weight"].shape[1]
    config = CLIPConfig(
        vision_config=dict(hidden_size=v_width, image_size=patch * grid, patch_size=patch,
                           num_hidden_layers=layers("visual.transformer.resblocks."),
                           num_attention_heads=OPEN_CLIP_VISION_HEADS.get(v_width, v_width // 64),
                           intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           hidden_act="gelu", layer_norm_eps=1e-5),
        text_config=dict(hidden_size=t_width, vocab_size=state["token_embedding.weight"].shape[0],
                         max_position_embeddings=state["positional_embedding"].shape[0],
                         num_hidden_layers=layers("transformer.resblocks."), num_attention_heads=t_width // 64,
                         intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        projection_dim=state["text_projection"].shape[1])
    out = {"logit_scale": state["logit_scale"], "text_projection.weight": state["text_projection"].T,
           "visual_projection.weight": state["visual.proj"].T,
           "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": state["ln_final.bias"],
           "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": state["visual.ln_post.bias"]}
    for ours, theirs in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        for i in range(layers(f"{theirs}.resblocks.")):
            src, dst = f"{theirs}.resblocks.{i}.", f"{ours}.encoder.layers.{i}."
            for part, w in zip("qkv", state[src + "attn.in_proj_weight"].chunk(3)):
                out[f"{dst}self_attn.{part}_proj.weight"] = w
            for part, b in zip("qkv", state[src + "attn.in_proj_bias"].chunk(3)):
                out[f"{dst}self_attn.{part}_proj.bias"] = b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = state[f"{src}{a}.weight"], state[f"{src}{a}.bias"]
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def load_open_clip_checkpoint(checkpoint: str, tokenizer_dir: str, name: str):
    """(CLIPModel, tokenizer, preprocessing) of an open_clip checkpoint (its state dict, or ``{"state_dict": …}``
    as HPSv2 publishes it) and a CLIP tokenizer folder."""
    from transformers import AutoTokenizer
    from dgpo.models.weights_file import load_weights_only
    state = load_weights_only(checkpoint, f"reward {name!r}", "checkpoint (the published open_clip state dict)")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if isinstance(state, dict):  # saved from a DistributedDataParallel model
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not isinstance(state, dict) or "visual.conv1.weight" not in state:
        raise UserError(f"reward {name!r}: {checkpoint!r} is not an open_clip CLIP state dict (no visual.conv1.weight)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError):
        raise UserError(f"reward {name!r}: {tokenizer_dir!r} holds no CLIP tokenizer (a CLIP folder's tokenizer "
                        "files)") from None
    try:
        model = open_clip_to_transformers(state, tokenizer).eval().requires_grad_(False)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"reward {name!r}: {checkpoint!r} does not convert to a CLIP model ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    size = model.config.vision_config.image_size
    return model, tokenizer, {"size": size, "crop": size, "mean": CLIP_MEAN, "std": CLIP_STD}
