"""The registry of training methods: ``objective.name`` → an :class:`~dgpo.methods.objective.Objective`
subclass; :func:`register_objective` adds one (a plug-in's)."""

from __future__ import annotations

import torch

from dgpo.config import ConfigError
from dgpo.methods.objective import Objective
from dgpo.models.handle import FlowModel


_REGISTRY: dict[str, type[Objective]] = {}
#: The sections every training run has (:class:`dgpo.train_config.TrainConfig`'s fields; a test keeps them equal):
#: a method's own section cannot take one of these names.
SHARED_SECTIONS = ("world", "run", "model", "rollout", "reward", "advantage", "objective", "optim", "eval")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add a method (usable as ``objective.name``; its ``config_section``, if any, becomes the config section
    ``<name>:`` of every training run; a shared section's name is refused)."""
    if cls.config_section is not None and cls.name in SHARED_SECTIONS:
        raise ValueError(f"method {cls.name!r}: its config section would replace the shared section {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def method_sections() -> dict[str, tuple[type, str]]:
    """Every registered method's own config section: ``{name: (dataclass, label)}``, sorted by name."""
    _load_builtin()
    return {name: (cls.config_section, cls.label) for name, cls in sorted(_REGISTRY.items())
            if cls.config_section is not None}


def objective_class(name: str) -> type[Objective]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"objective.name: {name!r} is not a registered objective; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_objective(cfg, model: FlowModel, params: list[torch.nn.Parameter], shift: float) -> Objective:
    cls = objective_class(cfg.objective.name)
    cls.validate(cfg)
    return cls(cfg, model, params, shift)


def objective_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _dgpo():
    from dgpo.methods.dgpo import DGPO
    return DGPO


def _flow_grpo():
    from dgpo.methods.flow_grpo import FlowGRPO
    return FlowGRPO


def _diffusion_dpo():
    from dgpo.methods.diffusion_dpo import DiffusionDPO
    return DiffusionDPO


def _nft():
    from dgpo.methods.nft import NFT
    return NFT


_BUILT_IN = (_dgpo, _diffusion_dpo, _flow_grpo, _nft)


def _load_builtin() -> None:
    for load in _BUILT_IN:
        cls = load()
        _REGISTRY.setdefault(cls.name, cls)
