"""Tests of the shapes-world quality metric (a Fréchet distance in a small CNN's features)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgpo.worlds import quality as Q
from dgpo.worlds import shapes as W

from conftest import assert_margin

#: A quick network for tests (the project default is QualityConfig(), trained once and shipped with the package).
SMALL = dict(train_steps=80, train_seeds=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private DGPO_CACHE for the module (the in-process cache is keyed by path, so nothing leaks)."""
    path = tmp_path_factory.mktemp("dgpo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DGPO_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def net(cache_dir):
    return Q.feature_network(32, **SMALL)


@pytest.fixture(scope="module")
def test_set():
    """Renders of the test prompts (2 per prompt) and their prompts."""
    prompts = [p for p in W.prompts("test") for _ in range(2)]
    images = np.stack([W.render(p, 32, i) for i, p in enumerate(prompts)])
    return images, prompts


def test_default_config_is_the_full_one():
    cfg = Q.QualityConfig()
    assert cfg.train_steps >= 1000 and cfg.train_seeds >= 16 and cfg.image_size == 32
    assert Q.QualityConfig(train_steps=5).key() != cfg.key()


def test_cache_file_created_and_reused(cache_dir, net, monkeypatch):
    files = list((cache_dir / "quality").glob("*.safetensors"))
    cfg = Q.QualityConfig(image_size=32, **SMALL)
    assert files == [cache_dir / "quality" / f"{cfg.key()}.safetensors"]
    assert not list((cache_dir / "quality").glob("*.tmp"))
    mtime = files[0].stat().st_mtime_ns
    assert Q.feature_network(32, **SMALL) is net  # in-process cache
    # a fresh process (simulated: empty in-process cache) loads the file instead of training
    monkeypatch.setattr(Q, "_NETS", {})
    monkeypatch.setattr(Q, "_train", lambda cfg: pytest.fail("retrained although the weights are cached"))
    loaded = Q.feature_network(32, **SMALL)
    assert loaded is not net
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert files[0].stat().st_mtime_ns == mtime


def test_the_default_network_ships_and_is_never_trained_or_cached(tmp_path, monkeypatch):
    """The default config's weights come with the package (its file named by the config's key, so a change to the
    network's config or VERSION without shipping new weights fails here): an empty cache trains nothing and
    writes nothing."""
    cfg = Q.QualityConfig()
    assert Q.shipped_path(cfg).is_file(), "the default feature network's weights are not shipped for its key"
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path))
    monkeypatch.setattr(Q, "_NETS", {})
    monkeypatch.setattr(Q, "_train", lambda cfg: pytest.fail("trained although the package ships the weights"))
    net = Q.feature_network(32)
    assert net.config == cfg and list(tmp_path.iterdir()) == []


def test_a_damaged_shipped_file_is_passed_over_and_the_package_never_written(tmp_path, monkeypatch):
    """A shipped file that does not load: the network is trained into the cache; the package folder is left as
    it was."""
    shipped, cache = tmp_path / "package", tmp_path / "cache"
    shipped.mkdir()
    monkeypatch.setattr(Q, "SHIPPED_WEIGHTS", shipped)
    monkeypatch.setenv("DGPO_CACHE", str(cache))
    monkeypatch.setattr(Q, "_NETS", {})
    tiny = {"train_steps": 3, "train_seeds": 1}
    bad = Q.shipped_path(Q.QualityConfig(**tiny))
    bad.write_bytes(b"not safetensors")
    net = Q.feature_network(32, **tiny)
    assert (cache / "quality" / bad.name).is_file() and net.config.key() == bad.stem
    assert bad.read_bytes() == b"not safetensors" and sorted(shipped.iterdir()) == [bad]


@pytest.mark.slow
def test_the_shipped_network_is_what_its_training_gives(test_set):
    """Training the default config from scratch (single-threaded, seeded) reproduces the shipped weights: the FD
    of a fixed comparison agrees within 1% (bit for bit on the machine that trained it; another CPU's floats
    may move it slightly)."""
    cfg = Q.QualityConfig()
    shipped = Q._load(cfg, Q.shipped_path(cfg))
    trained = Q._train(cfg)
    images, prompts = test_set
    blurred = images.reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4)).repeat(2, axis=1).repeat(2, axis=2)
    blurred = blurred.round().astype(np.uint8)
    fds = [Q.quality_fd(blurred, prompts, net=n) for n in (shipped, trained)]
    assert fds[0] > 0.5 and fds[1] == pytest.approx(fds[0], rel=0.01), fds


def test_features_shape_and_resize(net, test_set):
    images, _ = test_set
    f = Q.features(images[:5], net)
    assert f.shape == (5, 64) and f.dtype == np.float64
    np.testing.assert_array_equal(Q.features(images[:5], net), f)  # bit-identical on repeat
    np.testing.assert_allclose(Q.features(images[:2], net), f[:2], rtol=1e-12, atol=1e-12)
    big = np.stack([W.render("a photo of a circle", 64, s) for s in range(3)])
    assert Q.features(big, net).shape == (3, 64)
    with pytest.raises(ValueError, match="shape"):
        Q.features(images[0], net)
    with pytest.raises(ValueError, match="uint8"):
        Q.features(images.astype(np.float32), net)


def test_frechet_distance_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert Q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.arange(8) / 4.0
    assert Q.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # 1-d Gaussians: FD = (μa − μb)² + (σa − σb)²
    x = rng.normal(size=(5000, 1))
    y = 3 * x + 1
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert Q.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # a degenerate set (identical samples) is handled
    assert np.isfinite(Q.frechet_distance(np.zeros((10, 8)), a))
    with pytest.raises(ValueError):
        Q.frechet_distance(a[:1], a)


def test_fd_separates_renders_from_junk(cache_dir, test_set, outcome_seed):
    """Renders are far closer to the reference renders than blank images (FD at least 6× lower) or noise (5×),
    and renders of other prompts are farther than renders of these (1.35×). Each check's margin, (ratio − 1) /
    (bound − 1), for the quick feature networks trained from seeds 0-2 at 1 and 2 threads: blank 3.7-8.3×, noise 48-109×, other prompts 3.3-10×."""
    net = Q.feature_network(32, **SMALL, seed=outcome_seed)
    images, prompts = test_set
    fd_renders = Q.quality_fd(images, prompts, net=net)
    fd_blank = Q.quality_fd(np.zeros_like(images), prompts, net=net)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    fd_noise = Q.quality_fd(noise, prompts, net=net)
    # references follow the prompts: renders of other prompts are farther than renders of these
    other = [W.prompts("train")[i % 20] for i in range(len(prompts))]
    fd_other = Q.quality_fd(np.stack([W.render(p, 32, i) for i, p in enumerate(other)]), prompts, net=net)
    assert_margin(fd_blank / fd_renders - 1, 6 - 1, "FD blank / FD renders − 1", fd_renders=fd_renders,
                  fd_blank=fd_blank)
    assert_margin(fd_noise / fd_renders - 1, 5 - 1, "FD noise / FD renders − 1", fd_renders=fd_renders,
                  fd_noise=fd_noise)
    assert_margin(fd_other / fd_renders - 1, 1.35 - 1, "FD other prompts / FD renders − 1", fd_renders=fd_renders,
                  fd_other=fd_other)


def test_reference_renders_use_distinct_seeds():
    prompts = ["a photo of a circle", "a photo of a circle", "a photo of a square"]
    refs = Q.reference_renders(prompts, 32, reference_seeds_per_prompt=2)
    assert refs.shape == (6, 32, 32, 3)
    assert np.array_equal(refs[0], W.render(prompts[0], 32, Q.REFERENCE_SEED_BASE))
    assert np.array_equal(refs[3], W.render(prompts[0], 32, Q.REFERENCE_SEED_BASE + 3))
    assert len({r.tobytes() for r in refs[:4]}) == 4


def test_fd_deterministic_across_calls_and_processes(cache_dir, net, test_set):
    images, prompts = test_set
    fd1 = Q.quality_fd(images, prompts, net=net)
    fd2 = Q.quality_fd(images, prompts, net=net)
    assert fd1 == fd2
    np.save(cache_dir / "images.npy", images)
    code = (
        "import sys, numpy as np\n"
        "from dgpo.worlds import quality as Q, shapes as W\n"
        f"images = np.load({str(cache_dir / 'images.npy')!r})\n"
        f"prompts = [p for p in W.prompts('test') for _ in range(2)]\n"
        f"Q._train = lambda cfg: sys.exit('retrained')\n"
        f"print(repr(Q.quality_fd(images, prompts, net=Q.feature_network(32, **{SMALL!r}))))\n"
    )
    env = dict(os.environ, DGPO_CACHE=str(cache_dir), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == fd1


def test_quality_fd_checks_lengths(net, test_set):
    images, prompts = test_set
    with pytest.raises(ValueError, match="prompts"):
        Q.quality_fd(images, prompts[:-1], net=net)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_first_build_inside_a_no_grad_evaluation(tmp_path, monkeypatch, context):
    """The network is trained lazily on first use, which for `dgpo train` is inside a no-grad evaluation:
    training must run under its own grad mode whatever the caller's (a fresh machine crashed here)."""
    import torch
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path))
    monkeypatch.setattr(Q, "_NETS", {})
    with getattr(torch, context)():
        net = Q.feature_network(32, train_steps=3, train_seeds=1)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert (tmp_path / "quality" / f"{net.config.key()}.safetensors").is_file()
