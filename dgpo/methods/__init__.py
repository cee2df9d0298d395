"""Training objectives that plug into the one online loop of :mod:`dgpo.trainer`.

The trainer owns everything the methods share — prompts, rollout noise, rewards, group advantages, the
optimiser step, gradient clipping, EMAs of the policy, evaluation, checkpoints and the run folder — and asks
the objective (``objective.name`` in the config) only for what differs between methods:

* ``rollout(embeds, noise, gen, rows, total)`` — how samples are drawn (ODE, or SDE with per-step
  log-probabilities), returning clean latents and per-sample extras the update needs; ``rows`` of a global
  batch of ``total`` are this process's (random numbers are drawn for the global batch, see
  :mod:`dgpo.runtime.processes`); ``rollout_context()`` — whose weights sample (``None``: the trainer's policy /
  policy-EMA choice);
* ``minibatches(batch, gen)`` — how one epoch's batch is split into optimiser steps;
* ``backward(batch, gen, backward)`` — accumulate the gradient of its loss on a :class:`RolloutBatch` and
  return diagnostics (``loss`` first). On several processes the batch is this process's share: draw random
  numbers with the batch's ``rand``/``randn`` and scale a mean over its rows by ``batch.share()``; the trainer
  sums the gradients over processes. A method that cannot (its loss joins rows that may sit on two
  processes) sets ``multi_process = False``;
* ``emas()`` — extra parameter EMAs it keeps (checkpointed under these names), ``after_epoch(step)`` —
  their update;
* ``validate(cfg)`` — cross-key checks, raising :class:`ConfigError` that names the key;
* ``config_section`` — a dataclass of the method's own keys (typed :func:`dgpo.config.option` fields): it
  becomes the section ``<name>:`` of the training config (:func:`dgpo.train_config.train_config_class`).

NFE are counted by the trainer from the transformer calls themselves (every method alike).

Register a new method with :func:`register_objective`.
"""

from dgpo.methods.objective import Objective
from dgpo.methods.registry import (make_objective, method_sections, objective_class, objective_names,
                                   register_objective)

__all__ = ["Objective", "make_objective", "method_sections", "objective_class", "objective_names",
           "register_objective"]
