"""Caption fidelity: corrupt pretraining captions the way web captions are wrong, with the image kept true.

A caption of the grammar (:mod:`dgpo.worlds.shapes_captions`) admits these corruptions:

* ``relation_swap``: a position caption's relation replaced by its mirror (left of ↔ right of,
  above ↔ below);
* ``relation_drop``: a position caption loses its relation and becomes the two-object caption
  "a photo of a [c1] {shape1} and a [c2] {shape2}";
* ``wrong_colour``: one colour word replaced by another palette colour;
* ``count_off``: a counting caption's number moved by one, staying within two..four.

Only corruptions whose result lies in the caption set ``allowed`` apply (for pretraining, the set trained
on), so a corruption never produces a held-out caption. :func:`corrupt` picks a kind uniformly among the
kinds that apply, then a result uniformly among that kind's results; a caption to which none applies (an
uncoloured single or two-object caption, e.g. "a photo of a circle") stays as it is.
:func:`with_fidelity` keeps each caption with probability p and corrupts it otherwise, so the expected
fraction of corrupted entries is (1 − p)·(fraction of entries with some applicable corruption), which
:func:`expected_corrupted_fraction` computes. For the grammar's 576 pretraining captions 565 admit a
corruption within that set (the 11 that do not are uncoloured: "a photo of a circle", "a photo of a
circle and a square", and a few whose every corruption is held out), so a pool with equally many entries
per caption has (1 − p)·565/576 ≈ 0.98·(1 − p) of its captions corrupted.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Collection, Sequence

import numpy as np

from dgpo.worlds import shapes
from dgpo.worlds.shapes_captions import compose, parse_caption, template_of

__all__ = ["KINDS", "corruptions", "corrupt", "with_fidelity", "expected_corrupted_fraction"]

KINDS: tuple[str, ...] = ("relation_swap", "relation_drop", "wrong_colour", "count_off")
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@lru_cache(maxsize=None)
def _all_corruptions(caption: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every corruption of a caption by kind, before any restriction to an allowed set."""
    template, m = template_of(caption), parse_caption(caption)
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    if template == "position":
        out["relation_swap"].append(compose("position", m.shapes, m.colors, relation=MIRROR[m.relation]))
        out["relation_drop"].append(compose("two", m.shapes, m.colors))
    for i, colour in enumerate(m.colors):
        if colour is None:
            continue
        for other in shapes.COLORS:
            if other != colour:
                colours = tuple(other if j == i else c for j, c in enumerate(m.colors))
                out["wrong_colour"].append(compose(template, m.shapes, colours, m.count, m.relation))
    if template == "counting":
        for n in (m.count - 1, m.count + 1):
            if n in shapes.NUMBERS.values():
                out["count_off"].append(compose("counting", m.shapes, m.colors, count=n))
    return tuple((k, tuple(v)) for k, v in out.items())


def corruptions(caption: str, allowed: Collection[str] | None = None) -> dict[str, list[str]]:
    """The corrupted captions of each applicable kind (kinds with no result in ``allowed`` are left out;
    ``allowed=None`` allows every caption of the grammar)."""
    found = {k: [c for c in v if allowed is None or c in allowed] for k, v in _all_corruptions(caption.strip())}
    return {k: v for k, v in found.items() if v}


def corrupt(caption: str, rng: np.random.Generator, allowed: Collection[str] | None = None) -> str:
    """One corruption of ``caption``: a kind drawn uniformly among the applicable ones, then a result drawn
    uniformly within it; the caption itself when no corruption applies (no random numbers drawn then)."""
    options = corruptions(caption, allowed)
    if not options:
        return caption
    kind = list(options)[int(rng.integers(len(options)))]
    return options[kind][int(rng.integers(len(options[kind])))]


def with_fidelity(captions: Sequence[str], fidelity: float, rng: np.random.Generator,
                  allowed: Collection[str] | None = None) -> list[str]:
    """Each caption kept with probability ``fidelity`` (p), else replaced by :func:`corrupt` of it.

    One uniform u is drawn per entry, in order; the entry is corrupted when u ≥ p (probability 1 − p).
    With p = 1 the captions come back unchanged and nothing is drawn.
    """
    if not 0.0 <= fidelity <= 1.0:
        raise ValueError(f"fidelity must be in [0, 1], got {fidelity}")
    if fidelity == 1.0:
        return list(captions)
    allowed = frozenset(allowed) if allowed is not None else None
    return [corrupt(c, rng, allowed) if rng.random() >= fidelity else c for c in captions]


def expected_corrupted_fraction(captions: Sequence[str], fidelity: float,
                                allowed: Collection[str] | None = None) -> float:
    """(1 − p) · (fraction of ``captions`` with at least one applicable corruption)."""
    allowed = frozenset(allowed) if allowed is not None else None
    applicable = sum(bool(corruptions(c, allowed)) for c in captions)
    return (1.0 - fidelity) * applicable / max(len(captions), 1)
