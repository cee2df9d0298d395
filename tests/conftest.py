"""Shared fixtures: a tiny base model pretrained in seconds into a temporary cache."""

import os
import tempfile
from contextlib import contextmanager

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
