"""The OCR reward: does the image show the text its prompt quotes? Read with PP-OCR, scored by edit distance.

The target is the first double-quoted span of the prompt (``a neon sign that says "OPEN 24 HOURS"`` →
``OPEN 24 HOURS``). The image is read by PP-OCR (detection + recognition; ``rapidocr`` ships the weights in
its wheel, run on onnxruntime, nothing is downloaded), the recognised pieces are joined, and the score is the
one the text-rendering literature uses:

    r = 1 − min(d(ŝ, s), |s|) / |s|

with s the target and ŝ the recognised text, both lower-cased with white space removed, and d the Levenshtein
distance (``rapidfuzz``). r = 1 for the exact text, 0 for nothing legible; a prompt without a quoted target
is an error (this reward has nothing to compare with).

    pip install -e ".[ocr]"          # rapidocr, onnxruntime, rapidfuzz
    dgpo train --set reward.name=ocr ...
    dgpo serve-reward ocr --port 8765  # on the machine that holds the OCR model
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dgpo.errors import UserError, shown
from dgpo.rewards.protocol import RewardInputError, check_batch

_QUOTED = re.compile(r'"([^"]+)"')


def target_text(prompt: str) -> str:
    """The first double-quoted span of a prompt; a :class:`RewardInputError` when there is none."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise RewardInputError(f'the ocr reward needs the text to render in double quotes in the prompt, e.g. '
                               f'a sign that says "OPEN"; got {shown(prompt)!r}')
    return match.group(1)


def normalise(text: str) -> str:
    return "".join(text.split()).lower()


def edit_distance_score(recognised: str, target: str) -> float:
    """1 − min(d, |s|) / |s| on normalised texts (the module's formula); 1.0 for an empty target read as empty."""
    from rapidfuzz.distance import Levenshtein
    s, read = normalise(target), normalise(recognised)
    if not s:
        return 1.0 if not read else 0.0
    return 1.0 - min(Levenshtein.distance(read, s), len(s)) / len(s)


def _packaged_models() -> dict[str, str]:
    """The PP-OCR weights inside the rapidocr wheel (detection, recognition)."""
    import rapidocr
    root = Path(rapidocr.__file__).parent / "models"
    found = {kind: sorted(root.glob(f"*_{kind}_*.onnx")) for kind in ("det", "rec")}
    if not all(found.values()):
        raise UserError(f"the installed rapidocr ships no PP-OCR weights under {root}; install the wheel "
                        f'(pip install -e ".[ocr]") rather than a source build')
    return {kind: str(paths[-1]) for kind, paths in found.items()}


class OCRReward:
    """``reward(images, prompts)``: each image's edit-distance score against its prompt's quoted text."""

    name = "ocr"

    def __init__(self, threads: int = 0):
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise UserError('the ocr reward needs rapidocr, onnxruntime and rapidfuzz: pip install -e ".[ocr]"') from None
        models = _packaged_models()
        self.engine = RapidOCR(params={
            "Global.log_level": "error", "Global.use_cls": False,  # generated text is upright
            "Det.model_path": models["det"], "Rec.model_path": models["rec"],
            "EngineConfig.onnxruntime.intra_op_num_threads": threads or -1})

    def __repr__(self) -> str:
        return "OCRReward()"

    def read(self, image: np.ndarray) -> str:
        """The text PP-OCR reads in an image, its pieces joined by spaces in reading order."""
        result = self.engine(np.ascontiguousarray(image))
        return " ".join(result.txts) if result.txts else ""

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = check_batch(images, prompts, "ocr reward")
        targets = [target_text(p) for p in prompts]  # every prompt checked before any image is read
        return np.array([edit_distance_score(self.read(im), t) for im, t in zip(images, targets)], dtype=np.float64)

