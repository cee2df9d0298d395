"""Named adapter roles on one backbone.

A recipe that needs several models of the same architecture keeps one frozen backbone and one LoRA adapter
per *role* on it (peft adapters, see :mod:`dgpo.models.lora`): DGPO's ``policy``; TDM's ``student`` and
``fake`` score; TDM-R1 adds a ``surrogate`` reward. The *reference* is the backbone with every adapter
switched off (LoRA's B starts at zero, so a fresh role equals the reference). Exactly one role is live at a
time; every role keeps training (peft freezes the inactive adapters when it switches; which parameters
get gradients is decided by the caller's no-grad scopes instead).

Roles are saved and loaded by peft name (``transformer_blocks.0.attn.to_q.lora_A.weight`` …, the adapter
name dropped), so a checkpoint or an exported LoRA does not depend on the order parameters were created in.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from dgpo.models.lora import ATTENTION_PROJECTIONS, add_lora, lora_metadata, write_diffusers_lora


class AdapterRoles:
    """The roles on ``transformer``: add, switch, parameters, state by peft name, diffusers export."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.names: list[str] = []

    def add(self, role: str, rank: int, alpha: float | None = None,
            targets: tuple[str, ...] = ATTENTION_PROJECTIONS, seed: int = 0) -> list[torch.nn.Parameter]:
        """A new LoRA role (B = 0: it starts as the reference); returns its trainable parameters, in fp32
        whatever the backbone's dtype (a bf16 base keeps fp32 adapters and optimiser states)."""
        if role in self.names:
            raise ValueError(f"adapter role {role!r} exists already")
        add_lora(self.transformer, rank, alpha, targets, adapter_name=role, seed=seed)
        self.names.append(role)
        self._keep_trainable()
        params = self.parameters(role)
        for p in params:
            p.data = p.data.float()
        return params

    def remove(self, role: str) -> None:
        """Delete ``role``'s adapter from the backbone (the backbone can then serve another recipe)."""
        self._check(role)
        self.transformer.delete_adapters(role)
        self.names.remove(role)

    def parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The LoRA parameters of ``role``, in the backbone's module order."""
        return [p for _, p in self.named_parameters(role)]

    def named_parameters(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        """``(peft name, parameter)`` of ``role`` in :meth:`parameters`' order; the names are the keys of
        :meth:`state` and of the diffusers export."""
        self._check(role)
        return [(n.replace(f".{role}.", "."), p) for n, p in self.transformer.named_parameters()
                if "lora_" in n and f".{role}." in n]

    def config(self, role: str) -> dict:
        """The role's LoRA config (rank, alpha, targets), JSON-safe, as exported beside its weights."""
        self._check(role)
        return json.loads(json.dumps(lora_metadata(self.transformer, role), default=sorted))

    def scale(self, role: str) -> float:
        """``role``'s LoRA scale α / r (what its B·A product is multiplied by)."""
        config = self.transformer.peft_config[role]
        return float(config.lora_alpha) / float(config.r)

    @torch.no_grad()
    def load_scaled(self, role: str, weights: dict[str, torch.Tensor], scale: float, what: str) -> int:
        """Make ``role`` compute what LoRA ``weights`` (by peft name, trained at scale α / r = ``scale``) computed:
        A copied, B multiplied by ``scale`` / the role's scale; the role's layers the weights do not name get
        B = 0 (they add nothing). Names the role lacks or shapes that differ are one UserError naming ``what``.
        Returns how many of the role's layers the weights set."""
        from dgpo.errors import UserError
        mine = dict(self.named_parameters(role))
        unknown = sorted(set(weights) - set(mine))
        if unknown:
            raise UserError(f"{what}: the LoRA has layers this {role} adapter lacks (e.g. {unknown[0]}): set the "
                            f"{role}'s lora_targets to include them")
        wrong = next((k for k in weights if weights[k].shape != mine[k].shape), None)
        if wrong is not None:
            raise UserError(f"{what}: {wrong} has shape {tuple(weights[wrong].shape)}, this {role} adapter "
                            f"{tuple(mine[wrong].shape)}: set the {role}'s lora_rank to the LoRA's rank")
        ratio = scale / self.scale(role)
        for name, p in mine.items():
            if name in weights:
                p.copy_(weights[name] * (ratio if ".lora_B." in name else 1.0))
            elif ".lora_B." in name:
                p.zero_()
        return sum(1 for k in weights if ".lora_A." in k)

    @contextmanager
    def active(self, role: str):
        """``role`` is the live adapter inside the block (the previously live one again after it)."""
        self._check(role)
        previous = self.transformer.active_adapters()
        self.transformer.set_adapter(role)
        self._keep_trainable()
        try:
            yield
        finally:
            self.transformer.set_adapter(previous[0] if len(previous) == 1 else previous)
            self._keep_trainable()

    @contextmanager
    def reference(self):
        """The frozen backbone alone (every adapter off) inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()
            self._keep_trainable()

    def state(self, role: str) -> dict[str, torch.Tensor]:
        """The weights of ``role`` by peft name (adapter name dropped), detached copies."""
        self._check(role)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer, adapter_name=role).items()}

    @torch.no_grad()
    def load(self, role: str, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`state` into ``role``; a key that matches nothing is an error."""
        self._check(role)
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=role)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter {role!r}: the state has keys the model does not: {unexpected[:3]}")
        self._keep_trainable()

    def save_diffusers(self, role: str, folder: str | Path) -> Path:
        """``role`` as a diffusers LoRA folder (``pipe.load_lora_weights(folder)``), its rank and alpha with it."""
        return write_diffusers_lora(self.state(role), self.config(role), folder)

    def _check(self, role: str) -> None:
        if role not in self.names:
            raise KeyError(f"no adapter role {role!r}; the roles are {self.names}")

    def _keep_trainable(self) -> None:
        for role in self.names:
            for p in self.parameters(role):
                p.requires_grad_(True)
