"""The shapes world's sharpness beside the FD: high-frequency ratio and edge width against renders."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dgpo.evaluation.evaluate import format_table
from dgpo.runtime.metrics import eval_result
from dgpo.worlds import quality, sharpness
from dgpo.worlds import shapes as W
from dgpo.worlds.shapes_world import ShapesWorld

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Every test prompt once (33 images: cheap, and every category and colour appears)."""
    return W.prompts("test")


@pytest.fixture(scope="module")
def references(prompts) -> np.ndarray:
    """The very renders both measures compare with."""
    return quality.reference_renders(prompts, 32)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """Images blurred by a Gaussian of ``sigma`` px in each channel, rounded back to uint8."""
    out = ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Images with Gaussian pixel noise of ``std`` grey levels, rounded and clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


def test_renders_against_themselves_give_one(references, prompts):
    assert sharpness.high_frequency_ratio(references, prompts) == 1.0
    assert sharpness.edge_width(references, prompts) == 1.0


def test_other_renders_of_the_same_prompts_are_about_as_sharp(prompts):
    others = np.stack([W.render(p, 32, seed) for seed, p in enumerate(prompts)])
    assert sharpness.high_frequency_ratio(others, prompts) == pytest.approx(1.0, abs=0.15)
    assert sharpness.edge_width(others, prompts) == pytest.approx(1.0, abs=1e-9)  # every edge a 1 px step


def test_more_blur_lowers_the_high_frequency_ratio_and_widens_edges(references, prompts):
    ratios = [1.0] + [sharpness.high_frequency_ratio(blurred(references, s), prompts) for s in BLUR_SIGMAS]
    widths = [1.0] + [sharpness.edge_width(blurred(references, s), prompts) for s in BLUR_SIGMAS]
    assert all(later < 0.8 * earlier for earlier, later in zip(ratios, ratios[1:])), ratios
    assert all(later > earlier + 0.2 for earlier, later in zip(widths, widths[1:])), widths


def test_pixel_noise_raises_the_high_frequency_ratio(references, prompts):
    # from σ ≈ 10 up: fainter noise, half clipped away on the black background, dims edges about as much as it adds
    ratios = [sharpness.high_frequency_ratio(noisy(references, std), prompts) for std in (10.0, 20.0, 40.0)]
    assert 1.0 < ratios[0] < ratios[1] < ratios[2], ratios


def test_black_images_have_no_high_frequencies_and_no_edges(references, prompts):
    black = np.zeros_like(references)
    assert sharpness.high_frequency_ratio(black, prompts) == 0.0
    assert np.isnan(sharpness.edge_width(black, prompts))


def test_edge_width_in_pixels_is_rise_over_steepest_step():
    lines = np.array([
        [0, 0, 0, 100, 100, 100, 100, 100],  # a one-pixel step: 1 px
        [0, 25, 50, 75, 100, 100, 100, 100],  # a linear ramp over 4 px: 4 px
        [0, 10, 90, 100, 100, 100, 100, 100],  # rise 100, steepest step 80: 1.25 px
        [0, 0, 100, 100, 0, 0, 0, 0],  # up, then down: two edges of 1 px
        [0, 0, 20, 20, 0, 0, 0, 0],  # rise 20: below MIN_EDGE_CONTRAST, no edge
    ], dtype=np.float64)
    np.testing.assert_allclose(sharpness._edge_widths(lines), [1.0, 4.0, 1.25, 1.0, 1.0])


def test_edge_width_of_a_finely_sampled_gaussian_edge_is_sigma_root_two_pi():
    sigma = 6.0
    line = ndimage.gaussian_filter1d(np.repeat([0.0, 200.0], 100), sigma)
    (width,) = sharpness._edge_widths(line[None])
    assert width == pytest.approx(sigma * np.sqrt(2 * np.pi), rel=0.01)


@pytest.mark.parametrize("measure", [sharpness.high_frequency_ratio, sharpness.edge_width])
def test_bad_input_raises_one_clear_value_error(measure, references, prompts):
    with pytest.raises(ValueError, match="uint8"):
        measure(references.astype(np.float32), prompts)
    with pytest.raises(ValueError, match=r"shape \(N, S, S, 3\)"):
        measure(references[..., 0], prompts)
    with pytest.raises(ValueError, match=r"shape \(N, S, S, 3\)"):
        measure(references[:, :, :31], prompts)
    with pytest.raises(ValueError, match="at least one image"):
        measure(references[:0], [])
    with pytest.raises(ValueError, match="got 33 images but 32 prompts"):
        measure(references, prompts[:32])
    with pytest.raises(ValueError, match="but a single string"):
        measure(references, prompts[0])


def test_the_world_reports_sharpness_beside_the_fd(references, prompts, monkeypatch):
    monkeypatch.setattr(quality, "quality_fd", lambda images, prompts: 0.5)  # no feature network needed here
    world = ShapesWorld()
    result = world.score(blurred(references, 1.0), prompts, fd=True)
    assert result["fd"] == 0.5 and result["sharpness"] < 0.1 and result["edge_width"] > 2.0
    assert not {"fd", "sharpness", "edge_width"} & set(world.score(references, prompts, fd=False))


def test_summaries_show_sharpness_beside_the_fd():
    row = {"eval_geneval": 0.5, "eval_per_category": {"colors": 0.5}, "eval_partial": 0.6, "eval_fd": 0.4,
           "eval_sharpness": 0.25, "eval_edge_width": 2.5}
    table = format_table({"first": eval_result(row)})
    assert "| FD | sharpness | edge width |" in table and "| 0.40 | 0.25 | 2.50 |" in table
    older = {**row, "eval_sharpness": None, "eval_edge_width": None}  # a row from before the sharpness
    assert "sharpness" not in format_table({"first": eval_result(older)})
