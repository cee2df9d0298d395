"""Shared fixtures: a tiny base model pretrained in seconds into a temporary cache."""

import os
import tempfile
from contextlib import contextmanager

if os.environ.get("PYTEST_XDIST_WORKER"):  # two worker processes share the cores: one torch thread each, unless
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the caller set a count (also for the commands tests start)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests never touch the user's cache: everything cached goes to a fresh folder for this session.
os.environ["DGPO_CACHE"] = tempfile.mkdtemp(prefix="dgpo-test-cache-")

import pytest
import torch

# The tiny test bases shrink the benchmark-caption recipe (fast to render and train), not the default base
# (shipped pretrained, with the 576-caption grammar).
TINY_BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base", "shapes.yaml")
TINY_BASE = [
    "data.renders_per_prompt=2", "vae.steps=4", "vae.batch_size=8", "flow.steps=4", "flow.batch_size=8",
    "model.transformer.num_layers=2", "model.transformer.num_heads=2", "model.transformer.head_dim=16",
    "model.text.num_layers=2", "model.text.hidden_size=32", "model.text.projection_dim=32",
]


# ----------------------------------------------------------------------------------------- outcome margins
# A test whose verdict depends on a training or sampling outcome (a reward rises, a loss falls, a verifier
# scores a sample) takes the ``outcome_seed`` fixture and ends with :func:`assert_margin`. The default run
# uses seed 0; ``DGPO_OUTCOME_SEEDS=0,1,2`` runs each such test once per seed, and ``DGPO_OUTCOME_LOG=FILE``
# appends every measured margin to FILE (JSON lines): ``python scripts/diagnostics/outcome_margins.py`` runs
# them under 1 thread and the default thread count and writes the table that the docstrings quote.
OUTCOME_SEEDS = [int(s) for s in os.environ.get("DGPO_OUTCOME_SEEDS", "0").split(",") if s.strip()]


def pytest_generate_tests(metafunc):
    if "outcome_seed" in metafunc.fixturenames:
        metafunc.parametrize("outcome_seed", OUTCOME_SEEDS, ids=[f"seed{s}" for s in OUTCOME_SEEDS])


def pytest_collection_modifyitems(items):
    """Every test that takes ``outcome_seed`` is marked ``outcome`` (``pytest -m outcome`` selects them all)."""
    for item in items:
        if "outcome_seed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.outcome)


def assert_margin(effect: float, required: float, what: str, **detail):
    """Assert that a measured ``effect`` reaches ``required`` (both > 0 when it passes: e.g. a reward's rise
    and the smallest rise the test accepts), and log the margin ``effect / required`` when
    ``$DGPO_OUTCOME_LOG`` names a file. ``what`` names the quantity; ``detail`` (the raw values) goes into
    the log and the failure message."""
    import json
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    log = os.environ.get("DGPO_OUTCOME_LOG")
    if log:
        row = {"test": test, "what": what, "effect": float(effect), "required": float(required),
               "margin": float(effect) / float(required) if required > 0 else float("inf"),
               "threads": torch.get_num_threads(),
               **{k: float(v) if isinstance(v, (int, float)) else v for k, v in detail.items()}}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert effect >= required, f"{what}: {effect:.4g} < {required:.4g}; {detail}"


def load_script(relative: str):
    """A script of the repository (e.g. "scripts/chaos.py") as a module, to test its functions."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def http_stub(handler_cls):
    """A threaded HTTP server on a free loopback port answering with ``handler_cls`` (a
    ``BaseHTTPRequestHandler``); yields its port, shut down after."""
    import threading
    from http.server import ThreadingHTTPServer
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def cache_dir():
    """The private DGPO_CACHE of this test session."""
    from pathlib import Path
    return Path(os.environ["DGPO_CACHE"])


@pytest.fixture(scope="session")
def tiny_base_cfg(cache_dir):
    from dgpo.cli import load_base_config
    return load_base_config(TINY_BASE_CONFIG, TINY_BASE)


@pytest.fixture(scope="session")
def tiny_base(tiny_base_cfg):
    """Path of a tiny pretrained shapes base (a real saved StableDiffusion3Pipeline)."""
    from dgpo.worlds.shapes_base.pretrain import ensure_base
    torch.manual_seed(0)
    return ensure_base(tiny_base_cfg, log=lambda *a: None)
