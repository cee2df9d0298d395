"""Rewards that are CLIP models, read from local paths in their published formats (nothing is downloaded):

- ``clip_score``: CLIPScore (Hessel et al. 2021, Eq. 1): 2.5 · max(cos(E_I(x), E_T(p)), 0), with a
  transformers CLIP folder (e.g. openai/clip-vit-large-patch14 as saved by ``save_pretrained``);
- ``pickscore``: PickScore (Kirstain et al. 2023): the learned logit scale · cos(E_I(x), E_T(p)) of the
  PickScore_v1 CLIP-H folder (a transformers ``CLIPModel``); it ranks images of one prompt (about 18–23);
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


def clip_pixels(pixels: torch.Tensor, size: int, crop: int, mean, std) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] → CLIP's input: shortest side to ``size`` (bicubic, antialiased), centre
    ``crop``, normalised. Differentiable."""
    h, w = pixels.shape[-2:]
    short, long = min(h, w), max(h, w)
    other = int(size * long / short)  # as CLIPImageProcessor rounds the long side
    out = (size, other) if h <= w else (other, size)
    resized = torch.nn.functional.interpolate(pixels, size=out, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized.shape[-2] - crop) // 2, (resized.shape[-1] - crop) // 2
    x = resized[..., top:top + crop, left:left + crop]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class CLIPReward:
    """``clip_score``, ``pickscore`` (text–image) and ``aesthetic`` (image only) over a local CLIP (see the
    module docstring)."""

    def __init__(self, kind: str, model: str, batch_size: int = 64):
        if kind not in ("clip_score", "pickscore", "aesthetic"):
            raise ValueError(f"unknown CLIP reward {kind!r}")
        if not model:
            need = "CLIP_DIR,HEAD.pth" if kind == "aesthetic" else "CLIP_DIR"
            raise UserError(f"reward {kind!r} needs its model on disk: --set reward.model={need}")
        self.name, self.kind, self.batch_size = kind, kind, batch_size
        folder, _, head = model.partition(",")
        if kind == "aesthetic" and not head:
            raise UserError("reward 'aesthetic' needs reward.model=CLIP_DIR,HEAD.pth (a CLIP ViT-L/14 folder and the "
                            "LAION aesthetic predictor's state dict)")
        self.clip, self.tokenizer, self.settings = load_clip_folder(folder, kind)
        self.head = load_aesthetic_head(head, self.clip.config.projection_dim) if kind == "aesthetic" else None

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from dgpo.rewards import _check_batch
        images, prompts = _check_batch(images, prompts, f"{self.name} reward")
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
        return self.clip.logit_scale.exp() * cos


def projected(features) -> torch.Tensor:
    """CLIP's projected embedding from ``get_image_features`` / ``get_text_features``: a tensor in transformers 4,
    the output's ``pooler_output`` in transformers 5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_aesthetic_head(path: str, width: int) -> torch.nn.Sequential:
    """The LAION aesthetic predictor v2's MLP from its state dict (``torch.load(weights_only=True)``)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"reward 'aesthetic': no head file {path!r} (the predictor's .pth state dict)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding objects that weights_only refuses
        raise UserError(f"reward 'aesthetic': {path!r} is not a plain state dict ({type(e).__name__}); nothing in it "
                        "was unpickled") from None
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
