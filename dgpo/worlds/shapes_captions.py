"""The shapes world's caption grammar: the base's pretraining distribution (spec v2; ``docs/shapes.md``).

Every caption is in the benchmark's phrasing family "a photo of …", with an optional colour word on every
object ([c] below: one of the four palette colours, or nothing):

* single:   ``a photo of a [c] {shape}``                                            3·5 = 15
* two:      ``a photo of a [c1] {shape1} and a [c2] {shape2}``, shape1 ≠ shape2       6·5·5 = 150
* counting: ``a photo of {two,three,four} [c] {shape}s`` (all N objects in c)         3·3·5 = 45
* position: ``a photo of a [c1] {shape1} {left of,right of,above,below} a [c2] {shape2}``,
  shape1 ≠ shape2                                                                     6·4·5·5 = 600

810 captions in all; colours are independent (equal colours allowed). The six benchmark templates are the
uncoloured and fully coloured corners of it: every benchmark prompt is a caption, with the same meaning.

Held-out rule: a caption is held out from pretraining when deleting some (possibly none) of its colour
words gives a benchmark *test* prompt: the test prompts themselves and every coloured variant of them.
What is left is :func:`pretraining_captions`.

Each caption's meaning is a :class:`dgpo.worlds.shapes.ParsedPrompt`, so :func:`render_caption`,
:func:`score_caption` and :func:`partial_score_caption` reuse the benchmark renderer and verifier.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np

from dgpo.worlds import shapes
from dgpo.worlds.shapes import NUMBERS, RELATIONS, SHAPES, ParsedPrompt

__all__ = [
    "TEMPLATES",
    "captions",
    "parse_caption",
    "template_of",
    "compose",
    "colour_deletions",
    "is_held_out",
    "pretraining_captions",
    "render_caption",
    "score_caption",
    "partial_score_caption",
]

TEMPLATES: tuple[str, ...] = ("single", "two", "counting", "position")
_COLOURS: tuple[str | None, ...] = (None, *shapes.COLORS)


def _phrase(color: str | None, noun: str) -> str:
    return noun if color is None else f"{color} {noun}"


def compose(template: str, shape_list: tuple[str, ...], colors: tuple[str | None, ...], count: int = 1,
            relation: str | None = None) -> str:
    """The caption text of a meaning, e.g. compose("position", ("circle", "square"), ("red", None),
    relation="left of") = "a photo of a red circle left of a square"."""
    if template == "single":
        return f"a photo of a {_phrase(colors[0], shape_list[0])}"
    if template == "two":
        return f"a photo of a {_phrase(colors[0], shape_list[0])} and a {_phrase(colors[1], shape_list[1])}"
    if template == "counting":
        word = {n: w for w, n in NUMBERS.items()}[count]
        return f"a photo of {word} {_phrase(colors[0], shape_list[0] + 's')}"
    if template == "position":
        return (f"a photo of a {_phrase(colors[0], shape_list[0])} {relation} "
                f"a {_phrase(colors[1], shape_list[1])}")
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def _meaning(template: str, shape_list: tuple[str, ...], colors: tuple[str | None, ...], count: int = 1,
             relation: str | None = None) -> ParsedPrompt:
    """The verifier's reading: the benchmark category whose rule the caption falls under."""
    if template == "single":
        category = "single_object" if colors[0] is None else "colors"
    elif template == "two":
        category = "two_object" if colors == (None, None) else "color_attr"
    else:
        category = template
    return ParsedPrompt(category, shape_list, colors, count=count, relation=relation)


def _enumerate() -> dict[str, tuple[str, ParsedPrompt]]:
    """caption → (template, meaning), in canonical order (template, then shapes, relation, colours)."""
    table: dict[str, tuple[str, ParsedPrompt]] = {}

    def add(template, shape_list, colors, count=1, relation=None):
        text = compose(template, shape_list, colors, count, relation)
        table[text] = (template, _meaning(template, shape_list, colors, count, relation))

    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    for s in SHAPES:
        for c in _COLOURS:
            add("single", (s,), (c,))
    for a, b in pairs:
        for ca in _COLOURS:
            for cb in _COLOURS:
                add("two", (a, b), (ca, cb))
    for n in NUMBERS.values():
        for s in SHAPES:
            for c in _COLOURS:
                add("counting", (s,), (c,), count=n)
    for a, b in pairs:
        for rel in RELATIONS:
            for ca in _COLOURS:
                for cb in _COLOURS:
                    add("position", (a, b), (ca, cb), relation=rel)
    return table


_TABLE: dict[str, tuple[str, ParsedPrompt]] = _enumerate()


def captions() -> list[str]:
    """Every caption of the grammar (810), in canonical order; held-out ones included."""
    return list(_TABLE)


def _lookup(caption: str) -> tuple[str, ParsedPrompt]:
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    entry = _TABLE.get(caption.strip())
    if entry is None:
        raise ValueError(f"caption {caption!r} is not in the shapes caption grammar "
                         "(dgpo.worlds.shapes_captions.captions()), e.g. 'a photo of three red circles'")
    return entry


def parse_caption(caption: str) -> ParsedPrompt:
    """The meaning of a caption (for a benchmark prompt, exactly :func:`dgpo.worlds.shapes.parse`'s)."""
    return _lookup(caption)[1]


def template_of(caption: str) -> str:
    """Which of :data:`TEMPLATES` a caption is written in."""
    return _lookup(caption)[0]


def colour_deletions(caption: str) -> set[str]:
    """Every string obtained from ``caption`` by deleting some (possibly none) of its colour words."""
    words = caption.strip().split()
    where = [i for i, w in enumerate(words) if w in shapes.COLORS]
    return {" ".join(w for i, w in enumerate(words) if i not in set(drop))
            for k in range(len(where) + 1) for drop in combinations(where, k)}


@lru_cache(maxsize=1)
def _test_prompts() -> frozenset[str]:
    return frozenset(shapes.prompts("test"))


def is_held_out(caption: str) -> bool:
    """Whether a caption is kept out of pretraining: some colour deletion of it is a test prompt."""
    return not colour_deletions(caption).isdisjoint(_test_prompts())


@lru_cache(maxsize=1)
def _pretraining() -> tuple[str, ...]:
    return tuple(sorted(c for c in _TABLE if not is_held_out(c)))


def pretraining_captions() -> list[str]:
    """The captions a base may pretrain on, sorted: the grammar minus the held-out ones — 576 captions.

    Of the 810 captions, 234 are held out: the 33 test prompts and their coloured variants (a test prompt
    "a photo of a square left of a circle" holds out all 25 colourings of it, "a photo of a square" the
    five single-square captions). Some train prompts fall under the rule too (e.g. "a photo of a red
    square" when "a photo of a square" is a test prompt), so not every train prompt is here.
    """
    return list(_pretraining())


def render_caption(caption: str, size: int = 32, seed: int = 0) -> np.ndarray:
    """A random scene with exactly the caption's meaning, (size, size, 3) uint8, deterministic in
    (caption, size, seed); for a benchmark prompt it is :func:`dgpo.worlds.shapes.render`'s image."""
    return shapes.render_parsed(parse_caption(caption), size, seed, key=caption.strip())


def score_caption(image, caption: str) -> float:
    """Strict verifier score (0/1) of an image for a caption (:func:`dgpo.worlds.shapes.score_parsed`)."""
    return shapes.score_parsed(image, parse_caption(caption))


def partial_score_caption(image, caption: str) -> float:
    """Partial verifier score in [0, 1] of an image for a caption
    (:func:`dgpo.worlds.shapes.partial_score_parsed`)."""
    return shapes.partial_score_parsed(image, parse_caption(caption))
