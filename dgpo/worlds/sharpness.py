"""Sharpness of shapes-world images, beside the quality FD: do generated images carry the renders' crisp edges?

A few-step student or an RL-tuned policy may blur its images while the task score and even the FD
(:mod:`dgpo.worlds.quality`) barely move. Two cheap, deterministic (float64) measures compare a set of uint8
images (N, S, S, 3) with the renders of the same prompts (:func:`dgpo.worlds.quality.reference_renders`, the
references the FD uses), each as a ratio to the references, so 1.0 means "as sharp as the renders":

* :func:`high_frequency_ratio` — the energy of the discrete Laplacian of the grey image relative to the
  renders': < 1 blurred (high frequencies lost), > 1 noisier or harder-edged than the renders.
* :func:`edge_width` — the mean width of the edges met along rows and columns (rise / steepest step)
  relative to the renders': > 1 blurred (edges spread over more pixels). A render's edges are one-pixel
  steps, 1 px wide by this measure, so the ratio is also the images' edge width in pixels.

Both work on the grey image g = 0.299·R + 0.587·G + 0.114·B (0..255, float64); the same images give the same
numbers bit for bit.

Reading the numbers (S = 32, the 33 test prompts × 4 renders with seeds 0..131 against the references,
measured once; FD of the same images in brackets): the references themselves give exactly 1 and 1; other
renders of the same prompts 0.97 and 1.00 (FD 0.39) — scenes differ in how much edge they hold, so the
high-frequency ratio has a few per cent of sampling spread. Renders blurred by a Gaussian of σ = 0.5 px:
high-frequency ratio 0.35, edge width 1.35 (FD 0.48); σ = 1 px: 0.037 and 2.81 (FD 1.12); σ = 2 px: 0.0052
and 4.83 (FD 2.35). Renders with Gaussian pixel noise σ = 20 per channel (rounded, clipped): 1.21 and 1.17
(FD 1.46); σ = 40: 2.08 and 1.25 (FD 4.24). So a ratio well under 1 with an edge width above 1 is blur —
already visible at σ = 0.5, where the FD has barely moved — and a ratio above 1 with an edge width near 1 is
noise; black images give 0 and NaN.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dgpo.worlds import quality

__all__ = ["high_frequency_ratio", "edge_width"]

#: ITU-R BT.601 luma weights: the grey image both measures work on.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
#: An edge is a monotone run along a row or column whose ends differ by at least this many grey levels (of
#: 255). Every palette colour is ≥ 93 grey levels above the black background, so each object's border
#: qualifies, and a blur that halves an object's contrast still leaves its edges counted.
MIN_EDGE_CONTRAST = 40.0


def high_frequency_ratio(images, prompts: Sequence[str]) -> float:
    """High-frequency energy of ``images`` relative to renders of their ``prompts``; 1.0 = as sharp as renders.

    With Δg[i, j] = g[i−1, j] + g[i+1, j] + g[i, j−1] + g[i, j+1] − 4·g[i, j] on the (S−2)² interior pixels
    of an image's grey image g (no border convention needed), an image's energy is the mean of Δg² over those
    pixels and a set's energy E is the mean over its images;

        high_frequency_ratio = E(images) / E(reference_renders(prompts, S)).

    Below 1 the images lost high frequencies (blur), above 1 they carry more (pixel noise, harder edges);
    black images give 0. Faint noise barely moves it (the renders of the module docstring: 0.97 clean, 0.96
    with noise of σ = 5 grey levels per channel, 1.00 with σ = 10): clipped to 0..255, the noise on the black
    background is rectified, which dims the edges about as much as the noise adds. A ratio of set means, not a mean of per-image ratios: images and references are not
    paired scene by scene. ``images`` are uint8 (N, S, S, 3) with S ≥ 3, ``prompts[i]`` the prompt of
    ``images[i]``.
    """
    images, references = _images_and_references(images, prompts)
    return _laplacian_energy(images) / _laplacian_energy(references)


def edge_width(images, prompts: Sequence[str]) -> float:
    """Mean edge width of ``images`` relative to renders of their ``prompts``; 1.0 = as sharp as renders.

    Edges are read off the grey image's rows and columns (gradient profiles), not off the verifier's detected
    objects: the verifier reads a pixel as an object's by its distance to the palette, so blur shrinks and
    splits the objects it finds, and it exposes their boxes and areas but not their boundaries. Along every row
    and every column, an edge is a maximal run of consecutive pixel differences d_k = g[k+1] − g[k] of one
    strict sign (a monotone stretch between two extrema) whose rise |Σ_k d_k| is at least MIN_EDGE_CONTRAST
    grey levels. Its width is the width of the linear ramp with the same rise and the same steepest slope:

        width = Σ_k |d_k| / max_k |d_k|      (in pixels, over the steps k of the run),

    1 px for a one-pixel step (every edge of a render); σ·√(2π) ≈ 2.51·σ for a step blurred by a Gaussian of
    σ px ≫ 1 (close to its 10–90 % width, 2.56·σ; measured on 32 px renders: 2.81 at σ = 1, 4.83 at σ = 2,
    where the tails and the small objects' opposite edges cut in). A set's width W is the mean over all its
    edges;

        edge_width = W(images) / W(reference_renders(prompts, S)).

    Above 1 the edges are spread over more pixels (blur). Pixel noise raises it a little (a noisy step beside
    an edge lengthens its run) and breaks a blurred ramp into shorter runs, so read it beside
    :func:`high_frequency_ratio`, which blur lowers and noise raises. NaN when the images hold no edge of that
    contrast (e.g. black images).
    """
    images, references = _images_and_references(images, prompts)
    return _mean_edge_width(images) / _mean_edge_width(references)


def _images_and_references(images, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validated images and the reference renders of their prompts at the images' size."""
    images = quality._check_images(images)
    if len(images) == 0 or images.shape[1] < 3:
        raise ValueError(f"images must hold at least one image of at least 3×3 pixels, got shape {images.shape}")
    if isinstance(prompts, str) or len(prompts) != len(images):
        count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"need one prompt per image: got {len(images)} images but {count}")
    return images, quality.reference_renders(list(prompts), images.shape[1])


def _grey(images: np.ndarray) -> np.ndarray:
    """The grey images (N, S, S) in float64, 0..255."""
    return images.astype(np.float64) @ GREY_WEIGHTS


def _laplacian_energy(images: np.ndarray) -> float:
    """Mean over images of the mean squared 5-point Laplacian over the interior pixels of the grey image."""
    g = _grey(images)
    laplacian = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4.0 * g[:, 1:-1, 1:-1]
    return float(np.mean(laplacian**2, axis=(1, 2)).mean())


def _scanlines(images: np.ndarray) -> np.ndarray:
    """Every row and every column of every grey image, as the rows of one (2·N·S, S) array."""
    g = _grey(images)
    n, s, _ = g.shape
    return np.concatenate([g.reshape(n * s, s), g.transpose(0, 2, 1).reshape(n * s, s)])


def _edge_widths(lines: np.ndarray) -> np.ndarray:
    """The width (rise / steepest step, see :func:`edge_width`) of every edge along the rows of ``lines`` (M, S).

    The differences are laid end to end with a 0 after each line, so no run crosses from one line into the
    next; a run starts wherever a non-zero difference follows a difference of another sign (or a 0), and its
    steps are contiguous among the non-zero differences.
    """
    steps = np.diff(lines, axis=1)
    steps = np.concatenate([steps, np.zeros((len(steps), 1))], axis=1).ravel()
    sign = np.sign(steps)
    starts = (sign != 0) & (sign != np.concatenate([[0.0], sign[:-1]]))
    inside = sign != 0
    rise = np.abs(steps[inside])
    first = np.flatnonzero(starts[inside])  # each run's first step, among the non-zero steps
    contrast = np.add.reduceat(rise, first)
    steepest = np.maximum.reduceat(rise, first)
    edges = contrast >= MIN_EDGE_CONTRAST
    return contrast[edges] / steepest[edges]


def _mean_edge_width(images: np.ndarray) -> float:
    """Mean width over every edge of every image (NaN when there is none)."""
    widths = _edge_widths(_scanlines(images))
    return float(widths.mean()) if widths.size else float("nan")
