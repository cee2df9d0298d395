"""GenEval's rules as a reward, with a detector you plug in: ``reward.name: geneval``.

GenEval (Ghosh et al., 2023) scores an image against its prompt's metadata — ``{"tag": "position", "include":
[{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "exclude": [...]}``
— with an object detector and these rules (its ``evaluate_images.py``, restated here):

- each ``include`` clause (all must hold): the detector's ``count`` most confident objects of ``class`` exist;
  with ``color``, at least ``count`` of them are classified that colour; with ``position: [relation, j]``, each
  of them stands in ``relation`` to each object matched by clause j (:func:`relative_position`);
- each ``exclude`` clause (none may hold): fewer than ``count`` objects of ``class`` are detected;
- detections are kept above a confidence of 0.3 (0.9 for ``counting`` prompts), at most 16 per class.

The image's score is 1 when every clause holds and 0 otherwise (GenEval's "correct", what DGPO and TDM-R1 train
on); ``partial`` gives the fraction of clauses that hold instead.

The detector is the part that needs a big install: GenEval's is Mask2Former in mmdetection with CLIP ViT-L/14
classifying colours. ``reward.model`` chooses it:

- ``shapes``: the shapes world's own detector (:func:`dgpo.worlds.shapes.detect`: shape, palette colour and
  box of each object) — what the tests serve and train against, with shapes prompts written in GenEval's
  metadata format (:func:`shapes_metadata`);
- ``CONFIG.py,CHECKPOINT.pth,CLIP_DIR``: :class:`MMDetDetector` on a machine that has mmdetection (mmdet 3),
  the GenEval checkpoint and a transformers CLIP ViT-L/14 folder; serve it on its own GPU with
  ``dgpo serve-reward geneval --model CONFIG.py,CHECKPOINT.pth,CLIP_DIR`` and train with ``reward.name=remote``.
  It cannot run on this project's machines (no mmdetection, no weights), and is untested.

The prompt's metadata comes from a prompt-file world (GenEval's ``evaluation_metadata.jsonl`` lines, or its
training prompts with the same keys) and reaches a served reward over the JSON protocol with each batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dgpo.errors import UserError

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1


@dataclass
class Detection:
    """One detected object: its class, confidence, box (x0, y0, x1, y1), colour (None until classified) and
    segmentation mask (bool (H, W), when the detector gives one)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None
    mask: np.ndarray | None = None


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of A to B: the centre offset d = c_A − c_B shrunk towards 0 by ``threshold`` × the sum of
    both boxes' sizes on each axis; of the shrunk offset's direction (divided by |d|), x < −½ is "left of",
    x > ½ "right of", y < −½ "above", y > ½ "below" (image y grows downwards); none when it shrinks to 0."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    centre, size = boxes.mean(axis=1), np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre[0] - centre[1]
    shrunk = np.maximum(np.abs(offset) - threshold * (size[0] + size[1]), 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def check(objects: dict[str, list[Detection]], metadata: dict,
          classify_colors: Callable[[list[Detection], str], list[str]]) -> tuple[int, int]:
    """(clauses that hold, clauses) of ``metadata`` for ``objects`` (class → detections, most confident first);
    ``classify_colors(detections, class)`` names each detection's colour."""
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    held, matched = 0, []
    for clause in include:
        name, count = clause["class"], int(clause["count"])
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if ok and "color" in clause:
            ok = classify_colors(found, name).count(clause["color"]) >= count
        if ok and "position" in clause:
            relation, target = clause["position"]
            targets = matched[target] if target < len(matched) else None
            ok = targets is not None and all(relation in relative_position(obj, other)
                                             for obj in found for other in targets)
        matched.append(found if ok else None)
        held += ok
    held += sum(len(objects.get(clause["class"], [])) < int(clause["count"]) for clause in exclude)
    return held, len(include) + len(exclude)


class GenEvalReward:
    """GenEval's score of each image against its prompt's metadata, with ``detector(image, tag)`` → class →
    detections (most confident first) and ``detector.classify_colors``."""

    name = "geneval"

    def __init__(self, detector, partial: bool = False):
        self.detector, self.partial = detector, partial

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: list[dict] | None = None) -> np.ndarray:
        if metadata is None or len(metadata) != len(images):
            raise UserError("the geneval reward needs each prompt's GenEval metadata (tag, include): train on a "
                            "prompt-file world whose lines carry them")
        scores = []
        for image, meta in zip(images, metadata):
            if "include" not in meta:
                raise UserError(f"geneval: the prompt {meta.get('prompt', '')!r} has no 'include' clauses in its "
                                f"metadata (GenEval's format: tag, include, exclude)")
            objects = self.detector(image, meta.get("tag", ""))
            held, total = check(objects, meta, lambda found, name: self.detector.classify_colors(image, found, name))
            scores.append(held / total if self.partial else float(held == total))
        return np.asarray(scores, dtype=np.float64)


# ------------------------------------------------------------------------------------------- detectors

class ShapesDetector:
    """The shapes world's detector in GenEval's terms: every object at confidence 1, largest first, its palette
    colour as its colour."""

    def __call__(self, image: np.ndarray, tag: str = "") -> dict[str, list[Detection]]:
        from dgpo.worlds import shapes
        objects: dict[str, list[Detection]] = {}
        for obj in sorted(shapes.detect(image), key=lambda o: -o.area):
            x0, y0, x1, y1 = obj.bbox
            objects.setdefault(obj.shape, []).append(Detection(obj.shape, 1.0, (x0, y0, x1, y1), obj.color))
        return objects

    @staticmethod
    def classify_colors(image, found: list[Detection], name: str) -> list[str]:
        return [d.color or "" for d in found]


class MMDetDetector:
    """GenEval's detector: an mmdetection (3.x) model — GenEval's Mask2Former checkpoint — and CLIP ViT-L/14
    (a transformers folder) classifying each object's colour zero-shot on its masked crop over grey (#999), with
    GenEval's three prompt templates. Needs a GPU machine with mmdetection installed; not run here."""

    TEMPLATES = ("a photo of a {c} {n}", "a photo of a {c}-colored {n}", "a photo of a {c} object")

    def __init__(self, config: str, checkpoint: str, clip_dir: str, device: str = "cuda"):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError:
            raise UserError("the geneval reward's detector needs mmdetection (pip install mmdet, with mmcv for your "
                            "torch): serve it on a machine that has it (dgpo serve-reward geneval --model ...)") from None
        import torch
        from transformers import CLIPModel, CLIPProcessor
        self.inference = inference_detector
        self.model = init_detector(config, checkpoint, device=device)
        self.classes = list(self.model.dataset_meta["classes"])
        self.clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(clip_dir)
        self.device, self.torch, self.text_features = device, torch, {}

    def __call__(self, image: np.ndarray, tag: str = "") -> dict[str, list[Detection]]:
        threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
        result = self.inference(self.model, image[..., ::-1].copy())  # mmdet reads BGR arrays
        inst = result.pred_instances
        boxes, scores, labels = (inst.bboxes.cpu().numpy(), inst.scores.cpu().numpy(), inst.labels.cpu().numpy())
        masks = inst.masks.cpu().numpy() if "masks" in inst else None
        objects: dict[str, list[Detection]] = {}
        for i in np.argsort(-scores):
            if scores[i] <= threshold:
                break
            name = self.classes[int(labels[i])]
            if len(objects.get(name, [])) < MAX_OBJECTS:
                objects.setdefault(name, []).append(Detection(name, float(scores[i]), tuple(float(v) for v in boxes[i][:4]),
                                                              mask=None if masks is None else masks[i]))
        return objects

    def classify_colors(self, image: np.ndarray, found: list[Detection], name: str) -> list[str]:
        from dgpo.rewards.clip import projected  # transformers 5 returns an output object, not the tensor
        torch = self.torch
        if name not in self.text_features:
            texts = [t.format(c=c, n=name) for c in COLORS for t in self.TEMPLATES]
            tokens = self.processor(text=texts, return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                feats = torch.nn.functional.normalize(projected(self.clip.get_text_features(**tokens)), dim=-1)
            self.text_features[name] = torch.nn.functional.normalize(
                feats.view(len(COLORS), len(self.TEMPLATES), -1).mean(1), dim=-1)
        crops = []
        for det in found:
            grey = np.full_like(image, 0x99)
            pixels = np.where(det.mask[..., None], image, grey) if det.mask is not None else image
            x0, y0, x1, y1 = (int(round(v)) for v in det.box)
            crops.append(pixels[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)])
        inputs = self.processor(images=crops, return_tensors="pt").to(self.device)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(projected(self.clip.get_image_features(**inputs)), dim=-1)
        return [COLORS[int(i)] for i in (feats @ self.text_features[name].T).argmax(1)]


def make_geneval_reward(model: str = "", partial: bool = False) -> GenEvalReward:
    """``reward.name: geneval`` with ``reward.model``: ``shapes`` or ``CONFIG.py,CHECKPOINT.pth,CLIP_DIR``."""
    if model == "shapes":
        return GenEvalReward(ShapesDetector(), partial)
    parts = [p for p in model.split(",") if p]
    if len(parts) != 3:
        raise UserError(f"reward.model={model!r}: the geneval reward's detector is 'shapes' or "
                        f"'CONFIG.py,CHECKPOINT.pth,CLIP_DIR' (GenEval's Mask2Former, mmdetection installed)")
    return GenEvalReward(MMDetDetector(*parts), partial)


# ------------------------------------------------------------------------------------------- shapes prompts

def shapes_metadata(prompt: str) -> dict:
    """A shapes-world prompt's meaning in GenEval's metadata format (tag, include, exclude), e.g. "a photo of a
    circle left of a square" → include the square, then the circle with position ["left of", 0]."""
    from dgpo.worlds import shapes
    p = shapes.parse(prompt)

    def clause(shape: str, color: str | None, count: int = 1) -> dict:
        return {"class": shape, "count": count, **({"color": color} if color else {})}
    if p.category == "position":
        include = [clause(p.shapes[1], p.colors[1]), {**clause(p.shapes[0], p.colors[0]), "position": [p.relation, 0]}]
    else:
        include = [clause(s, c, p.count) for s, c in zip(p.shapes, p.colors)]
    exclude = [{"class": p.shapes[0], "count": p.count + 1}] if p.category == "counting" else []
    return {"tag": p.category, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": prompt}
