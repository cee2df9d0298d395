"""Shared fixtures: a tiny base model pretrained in seconds into a temporary cache."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

TINY_BASE = [
    "data.renders_per_prompt=2", "vae.steps=4", "vae.batch_size=8", "flow.steps=4", "flow.batch_size=8",
    "model.transformer.num_layers=2", "model.transformer.num_heads=2", "model.transformer.head_dim=16",
    "model.text.num_layers=2", "model.text.hidden_size=32", "model.text.projection_dim=32",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private DGPO_CACHE for the whole test session (never the user's cache)."""
    path = tmp_path_factory.mktemp("dgpo-cache")
    old = os.environ.get("DGPO_CACHE")
    os.environ["DGPO_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DGPO_CACHE", None)
    else:
        os.environ["DGPO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_base_cfg(cache_dir):
    from dgpo.cli import load_base_config
    return load_base_config(None, TINY_BASE)


@pytest.fixture(scope="session")
def tiny_base(tiny_base_cfg):
    """Path of a tiny pretrained shapes base (a real saved StableDiffusion3Pipeline)."""
    from dgpo.models.pretrain import ensure_base
    torch.manual_seed(0)
    return ensure_base(tiny_base_cfg, log=lambda *a: None)
