"""Image quality for the shapes world, apart from the task: a Fréchet distance in a small CNN's features.

The task score (:mod:`dgpo.worlds.shapes`) can be hacked by blobs, smears or saturated noise; this metric
does not reward the task. It compares the distribution of generated images with the distribution of
*renders of the same prompts* in the 64-d feature space of a small fixed CNN (:class:`FeatureNet`) that
is trained once, deterministically, on renders of this world. Its head predicts per-(colour, shape) object
counts, a coarse per-shape layout grid and (on randomly blurred / noised copies) the blur and noise levels,
so the features capture shapes, colours, layout and image cleanliness (a "FID for shapes").

Reading the numbers (default network, S = 32, the 33 test prompts × 4 images, measured once):
renders vs other renders of the same prompts ≈ 0.39 (sampling noise only; it shrinks with N);
renders with Gaussian pixel noise σ = 20 ≈ 1.3; 2× down-and-up blurred renders ≈ 1.4; renders of other
prompts ≈ 1.1; uniform-noise images ≈ 9.5; blank (black) images ≈ 19.6. Lower is better; 0 means identical
feature statistics. Compare FDs only at equal sample sizes (the estimator is biased upwards for small N).

The default network ships with the package (``quality_weights/<config key>.safetensors``, trained once by
:func:`_train` as below): every user gets the same weights, so FDs compare across machines, and a first run does
not spend a minute training it. Any other config is trained on first use and cached (safetensors, never pickle)
under ``cache_root() / "quality" / f"{config_hash}.safetensors"``. Features are computed in float64, so the same
images give the same FD bit-for-bit across calls and processes that load the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from dgpo.paths import cache_root, config_hash
from dgpo.runtime.output_dir import with_umask
from dgpo.worlds import shapes as world

__all__ = [
    "QualityConfig",
    "FeatureNet",
    "feature_network",
    "features",
    "frechet_distance",
    "quality_fd",
    "reference_renders",
    "REFERENCE_SEED_BASE",
]

VERSION = "shapes-quality-v1"
#: Reference renders for quality_fd use seeds REFERENCE_SEED_BASE + i (distinct from the seeds 0..k that
#: a caller might use for its own renders).
REFERENCE_SEED_BASE = 10_000
#: Training renders use seeds TRAIN_SEED_BASE + i (distinct from the reference seeds).
TRAIN_SEED_BASE = 100_000
GRID = 4  # layout targets: object centres per shape on a GRID×GRID grid


@dataclass(frozen=True)
class QualityConfig:
    """Everything that determines the trained feature network (hashed into the cache key)."""

    image_size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 64
    train_seeds: int = 24  # renders per prompt in the training set (126 prompts × 24 = 3024 images)
    train_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    max_noise: float = 32.0  # largest Gaussian noise std (in 0..255 units) of the training corruptions
    seed: int = 0
    version: str = VERSION

    def key(self) -> str:
        """The cache key: a hash of this config."""
        return config_hash(asdict(self))


def _n_targets() -> int:
    """Target size: counts per (colour, shape), per-shape centre counts on a GRID×GRID grid, 2 corruption levels."""
    return len(world.COLORS) * len(world.SHAPES) + len(world.SHAPES) * GRID * GRID + 2


class FeatureNet(nn.Module):
    """A small CNN: 3 × (conv3×3 → ReLU → avgpool2), flatten, linear → feature_dim features; a linear head.

    ``embed(x)`` gives the features (the pre-activation of the 64-d layer); ``forward(x)`` the head's
    predictions of the training targets from ReLU(features). Inputs are float images in [0, 1], NCHW.
    """

    def __init__(self, image_size: int = 32, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 64):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        c1, c2, c3 = channels
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )  # fmt: skip
        self.proj = nn.Linear(c3 * (image_size // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, _n_targets())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, feature_dim)."""
        return self.proj(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Target predictions (N, n_targets)."""
        return self.head(torch.relu(self.embed(x)))


# --------------------------------------------------------------------------------------------------
# Training data and training
# --------------------------------------------------------------------------------------------------


def _targets(image: np.ndarray) -> np.ndarray:
    """Training targets of a render, read off by the verifier (exact on renders).

    [counts per (colour, shape), colour-major] ++ [per shape, objects whose centre lies in each grid cell].
    """
    size = image.shape[0]
    colors, shapes_ = list(world.COLORS), list(world.SHAPES)
    counts = np.zeros((len(colors), len(shapes_)), dtype=np.float32)
    grid = np.zeros((len(shapes_), GRID, GRID), dtype=np.float32)
    for obj in world.detect(image):
        if obj.shape not in shapes_:
            continue
        counts[colors.index(obj.color), shapes_.index(obj.shape)] += 1
        gx = min(GRID - 1, int(obj.cx * GRID / size))
        gy = min(GRID - 1, int(obj.cy * GRID / size))
        grid[shapes_.index(obj.shape), gy, gx] += 1
    return np.concatenate([counts.ravel(), grid.ravel()])


def _training_set(cfg: QualityConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of every prompt with seeds TRAIN_SEED_BASE + 0..train_seeds−1, and their targets."""
    images, targets = [], []
    for prompt in world.prompts("all"):
        for i in range(cfg.train_seeds):
            im = world.render(prompt, cfg.image_size, TRAIN_SEED_BASE + i)
            images.append(im)
            targets.append(_targets(im))
    x = _to_tensor(np.stack(images), torch.float32)
    return x, torch.from_numpy(np.stack(targets))


def _corrupt(x: torch.Tensor, gen: torch.Generator, max_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade half of a batch with 3×3 blur and half with Gaussian noise; return images and levels.

    x' = quantise₂₅₅(clip((1 − α)·x + α·blur₃ₓ₃(x) + σ·ε)), with α ~ U(0, 1) and σ ~ U(0, max_noise/255)
    each applied to a random half; the levels (σ / (max_noise/255), α) are extra regression targets, which
    makes the features sensitive to noise and blur, not only to the scene's content.
    """
    n = x.shape[0]
    alpha = torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)
    level = torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)
    blurred = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    a = alpha.view(n, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen) * (level * max_noise / 255.0).view(n, 1, 1, 1)
    out = ((1 - a) * x + a * blurred + noise).clamp(0.0, 1.0)
    out = torch.round(out * 255.0) / 255.0
    return out, torch.stack([level, alpha], dim=1)


@contextlib.contextmanager
def _single_thread():
    """Run torch on one intra-op thread (restored afterwards).

    The nets are tiny: on a small, shared CPU, multi-threaded intra-op kernels were measured 10–25× slower
    than one thread (spinning workers), and one thread also fixes the reduction order.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(cfg: QualityConfig) -> FeatureNet:
    """Train the feature network deterministically (fixed data, seeded init, batches and corruptions).

    Adam with a cosine schedule on the MSE between the head's predictions and [scene targets, corruption
    levels] (see :func:`_targets`, :func:`_corrupt`).
    """
    # trained lazily on first use, often inside a no-grad evaluation: take our own grad mode
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]), _single_thread():
        x, y = _training_set(cfg)
        torch.manual_seed(cfg.seed)
        net = FeatureNet(cfg.image_size, cfg.channels, cfg.feature_dim)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.train_steps))
        net.train()
        for _ in range(cfg.train_steps):
            idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
            xb, levels = _corrupt(x[idx], gen, cfg.max_noise)
            loss = nn.functional.mse_loss(net(xb), torch.cat([y[idx], levels], dim=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------

_NETS: dict[str, FeatureNet] = {}  # in-process cache, keyed by the weights file path
_FLOAT64: "weakref.WeakKeyDictionary[FeatureNet, FeatureNet]" = weakref.WeakKeyDictionary()  # float64 copies


#: Networks shipped with the package (package data): the default config's, trained by :func:`_train`.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "quality_weights"


def _cache_path(cfg: QualityConfig) -> Path:
    return cache_root() / "quality" / f"{cfg.key()}.safetensors"


def shipped_path(cfg: QualityConfig) -> Path:
    """Where the package ships the network of ``cfg`` (a file only for the configs it ships: the default)."""
    return SHIPPED_WEIGHTS / f"{cfg.key()}.safetensors"


def _save(net: FeatureNet, cfg: QualityConfig, path: Path) -> None:
    """Save the weights atomically: a temp file in the same directory, then os.replace."""
    from dgpo.runtime.checkpoint import save_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_tensors(state, Path(tmp), metadata={"config": json.dumps(asdict(cfg), sort_keys=True)})
        os.replace(with_umask(tmp), path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(cfg: QualityConfig, path: Path) -> FeatureNet:
    from safetensors.torch import load_file

    net = FeatureNet(cfg.image_size, cfg.channels, cfg.feature_dim)
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net


def feature_network(image_size: int = 32, **overrides) -> FeatureNet:
    """The feature network for ``image_size``: from the in-process cache, the package (the default's), the disk
    cache, or trained now.

    ``overrides`` replace fields of :class:`QualityConfig` (e.g. ``train_steps=100, train_seeds=4`` for a
    quick test network); the project's default is the default config, whose weights ship with the package.
    Training another takes ~30–60 s on 2 CPU cores and happens once per cache directory; the weights are then
    loaded from ``cache_root()/quality/<hash>.safetensors``.
    """
    cfg = QualityConfig(image_size=image_size, **overrides)
    for path in (shipped_path(cfg), _cache_path(cfg)):
        net = _NETS.get(str(path))
        if net is not None and path.exists():
            return net
        if path.is_file():
            try:
                net = _load(cfg, path)
                break
            except Exception:  # a corrupt or incompatible file: the next place, or trained again
                net = None
    else:  # trained into the cache, never into the package
        path = _cache_path(cfg)
        net = _train(cfg)
        _save(net, cfg, path)
        net = _load(cfg, path)  # use exactly the stored weights, as a later process will
    net.config = cfg  # type: ignore[attr-defined]
    _NETS[str(path)] = net
    return net


# --------------------------------------------------------------------------------------------------
# Features and the Fréchet distance
# --------------------------------------------------------------------------------------------------


def _to_tensor(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, S, S, 3) → float (N, 3, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dtype) / 255.0


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be a uint8 array of shape (N, S, S, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    return images


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, S, S, 3) uint8 images to size×size with PIL bilinear (a no-op when S == size)."""
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def features(images, net: FeatureNet | None = None, batch_size: int = 256) -> np.ndarray:
    """Features (N, feature_dim) float64 of uint8 images (N, S, S, 3), resized to the net's input size.

    Computed in float64 on one CPU thread: the same images give bit-identical features in every call and
    process; a different batching changes them only at round-off level (~1e-15).
    """
    images = _check_images(images)
    net = net if net is not None else feature_network()
    images = _resize(images, net.image_size)
    net64 = _FLOAT64.get(net)
    if net64 is None:
        net64 = _FLOAT64[net] = copy.deepcopy(net).double().eval()
    out = []
    with torch.no_grad(), _single_thread():
        for i in range(0, len(images), batch_size):
            out.append(net64.embed(_to_tensor(images[i : i + batch_size], torch.float64)).numpy())
    if not out:
        return np.zeros((0, net.proj.out_features), dtype=np.float64)
    return np.concatenate(out)


def _sqrtm(m: np.ndarray, strict: bool = True) -> np.ndarray | None:
    """Real part of scipy.linalg.sqrtm(m); None (when strict) if scipy flags m as singular or the root is
    not finite."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = linalg.sqrtm(m)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if strict and (singular or not np.all(np.isfinite(root))):
        return None
    return np.real(root)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}), with unbiased covariances and the matrix square
    root from scipy.linalg.sqrtm (real part). When the product is singular (scipy warns, or the root is not
    finite), eps·I is added to both covariances. Tiny negative results from round-off are clamped to 0.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm(cov_a @ cov_b)
    if covmean is None:  # singular product (e.g. a set of identical images): regularise
        offset = eps * np.eye(a.shape[1])
        covmean = _sqrtm((cov_a + offset) @ (cov_b + offset), strict=False)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def reference_renders(prompts: Sequence[str], size: int, reference_seeds_per_prompt: int = 1) -> np.ndarray:
    """Reference renders for a list of prompts (one entry per generated image).

    The k-th occurrence of a prompt in ``prompts`` gets renders with seeds
    REFERENCE_SEED_BASE + k·r + j, j < r = reference_seeds_per_prompt; so the reference set follows the
    prompt distribution of the images and never repeats a seed.
    """
    if reference_seeds_per_prompt < 1:
        raise ValueError(f"reference_seeds_per_prompt must be >= 1, got {reference_seeds_per_prompt}")
    seen: dict[str, int] = {}
    out = []
    for prompt in prompts:
        k = seen.get(prompt, 0)
        seen[prompt] = k + 1
        base = REFERENCE_SEED_BASE + k * reference_seeds_per_prompt
        out.extend(world.render(prompt, size, base + j) for j in range(reference_seeds_per_prompt))
    return np.stack(out)


def quality_fd(
    images,
    prompts: Sequence[str],
    reference_seeds_per_prompt: int = 1,
    net: FeatureNet | None = None,
) -> float:
    """Shapes-FD: Fréchet distance between ``images`` (uint8 (N, S, S, 3)) and renders of their prompts.

    ``prompts[i]`` is the prompt of ``images[i]``; the references are :func:`reference_renders` at the
    images' size S (deterministic seeds from REFERENCE_SEED_BASE). Lower is better: renders against other
    renders of the same prompts give a small FD, blank or noise images a far larger one (see the module
    docstring). Deterministic: the same images give the same value bit-for-bit.
    """
    images = _check_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    refs = reference_renders(list(prompts), images.shape[1], reference_seeds_per_prompt)
    net = net if net is not None else feature_network()
    return frechet_distance(features(images, net), features(refs, net))


def _main() -> None:  # pragma: no cover - a manual check: train (or load) and print a few FDs
    t0 = time.time()
    net = feature_network()
    print(f"feature network ready in {time.time() - t0:.1f} s")
    test = world.prompts("test")
    ps = [p for p in test for _ in range(4)]
    renders = np.stack([world.render(p, 32, i) for i, p in enumerate(ps)])
    rng = np.random.default_rng(0)
    for name, ims in {
        "renders": renders,
        "blank": np.zeros_like(renders),
        "noise": rng.integers(0, 256, renders.shape, dtype=np.uint8),
    }.items():
        print(f"FD({name} vs renders) = {quality_fd(ims, ps, net=net):.3f}")


if __name__ == "__main__":  # pragma: no cover
    _main()
