"""The ocr reward: PP-OCR (weights from the rapidocr wheel) reads rendered words, clean and noisy, and the score
is 1 − min(edit distance, |target|) / |target| on normalised text."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from dgpo.errors import UserError
from dgpo.rewards.ocr import edit_distance_score, target_text
from dgpo.rewards import make_reward

WORDS = ["HELLO WORLD", "OPEN 24 HOURS", "diffusion"]


def rendered(text: str, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Black text on white, 256 × 256 (square, as generated images are: PP-OCR's detector scales the short
    side to 736 px, so a 512 × 128 strip costs it four times the pixels), with optional Gaussian pixel noise
    of std ``noise``."""
    im = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(im).text((10, 110), text, fill="black", font=ImageFont.load_default(size=24))
    arr = np.asarray(im).astype(np.float64)
    arr += np.random.default_rng(seed).normal(0.0, noise, arr.shape)
    return arr.clip(0, 255).astype(np.uint8)


def test_the_score_is_one_minus_the_normalised_edit_distance():
    assert edit_distance_score("Hello World", "hello world") == 1.0      # case and spaces do not count
    assert edit_distance_score("helo", "hello") == pytest.approx(1 - 1 / 5)  # one deletion
    assert edit_distance_score("", "hello") == 0.0
    assert edit_distance_score("a very long unrelated sentence", "hi") == 0.0  # clipped at |target|
    assert target_text('a neon sign that says "OPEN 24 HOURS" at night') == "OPEN 24 HOURS"


@pytest.fixture(scope="module")
def ocr():
    return make_reward("ocr", threads=1)


def test_ocr_reads_rendered_words_clean_and_noisy(ocr, outcome_seed):
    """Clean words read exactly, words under pixel noise of std 40 within 10 %, the wrong text and a blank
    image score low.

    Margin: the scores are exact edit-distance fractions (1.0 read, not a float that drifts), so the margin
    is on the noise: on the noise seeds of outcome seeds 0-2 the three words still read exactly at std 120
    and some are lost from std 140 (the detector finds no text); the engine runs on 1 thread, so the torch
    thread count does not enter. Measured margin (seeds 0-2): noise 3.0-3.5x the std 40 tested; the wrong
    text scores 0.1 and the blank 0 against the 0.3 allowed (3x, an edit distance of fixed strings)."""
    prompts = [f'a sign that says "{w}"' for w in WORDS]
    clean = ocr(np.stack([rendered(w) for w in WORDS]), prompts)
    noisy = ocr(np.stack([rendered(w, noise=40.0, seed=i + 3 * outcome_seed) for i, w in enumerate(WORDS)]), prompts)
    assert clean.tolist() == [1.0, 1.0, 1.0], clean
    assert noisy.min() >= 0.9, noisy
    # the wrong text, and no text at all, score low
    wrong = ocr(np.stack([rendered("GOODBYE"), np.full((256, 256, 3), 255, np.uint8)]), prompts[:2])
    assert wrong.max() <= 0.3, wrong


def test_a_prompt_without_quoted_text_is_one_clear_error(ocr):
    with pytest.raises(UserError, match="double quotes"):
        ocr(np.stack([rendered("HELLO")]), ["a sign that says hello"])
