"""The caption grammar (the base's pretraining distribution): its captions, the held-out rule, renders that
the verifier passes for every caption, a verifier that checks the colours the captions add, and a tokenizer
that knows every word."""

from __future__ import annotations

from collections import Counter
from itertools import combinations, product

import numpy as np
import pytest

from dgpo.worlds.shapes_base.pretrain import world_vocabulary
from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
from dgpo.worlds import shapes as W
from dgpo.worlds import shapes_captions as C

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
RELATIONS = ("left of", "right of", "above", "below")


def _np(colour, noun):
    return noun if colour is None else f"{colour} {noun}"


def spec_grammar() -> set[str]:
    """The grammar written out from the templates, independently of the module."""
    opt = (None, *COLOURS)
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    out = {f"a photo of a {_np(c, s)}" for s in SHAPES for c in opt}
    out |= {f"a photo of a {_np(ca, a)} and a {_np(cb, b)}" for (a, b), ca, cb in product(pairs, opt, opt)}
    out |= {f"a photo of {n} {_np(c, s + 's')}" for n in ("two", "three", "four") for s in SHAPES for c in opt}
    out |= {f"a photo of a {_np(ca, a)} {r} a {_np(cb, b)}" for (a, b), r, ca, cb in product(pairs, RELATIONS, opt, opt)}
    return out


def reductions(caption: str) -> set[str]:
    """Every string left after deleting some (possibly none) of the caption's colour words."""
    words = caption.split()
    where = [i for i, w in enumerate(words) if w in COLOURS]
    return {" ".join(w for i, w in enumerate(words) if i not in drop)
            for k in range(len(where) + 1) for drop in map(set, combinations(where, k))}


def test_the_grammar_is_every_template_with_optional_colours():
    assert set(C.captions()) == spec_grammar() and len(C.captions()) == 810
    assert Counter(C.template_of(c) for c in C.captions()) == {"single": 15, "two": 150, "counting": 45, "position": 600}
    for prompt in W.prompts("all"):  # the six benchmark templates are inside, with the benchmark's meaning
        assert C.parse_caption(prompt) == W.parse(prompt)
    with pytest.raises(ValueError, match="a photo of a dog"):
        C.parse_caption("a photo of a dog")
    with pytest.raises(ValueError):
        C.parse_caption("a photo of a red circle and a circle and a square")


def test_meanings_carry_every_colour():
    p = C.parse_caption("a photo of a red square left of a blue circle")
    assert (p.category, p.shapes, p.colors, p.relation) == ("position", ("square", "circle"), ("red", "blue"), "left of")
    p = C.parse_caption("a photo of three yellow triangles")
    assert (p.category, p.shapes, p.colors, p.count) == ("counting", ("triangle",), ("yellow",), 3)
    p = C.parse_caption("a photo of a green circle and a square")
    assert (p.category, p.colors) == ("color_attr", ("green", None))
    assert C.parse_caption("a photo of a red circle and a red square").colors == ("red", "red")


def test_pretraining_captions_hold_out_every_test_prompt_and_its_colourings():
    pre = C.pretraining_captions()
    test = set(W.prompts("test"))
    assert pre == sorted(pre) and len(pre) == len(set(pre)) == 576
    for caption in pre:
        assert reductions(caption).isdisjoint(test), caption
    # everything else of the grammar is kept: the held-out captions are exactly those reducing to a test prompt
    assert set(pre) == {c for c in spec_grammar() if reductions(c).isdisjoint(test)}
    train = W.prompts("train")
    kept = [p for p in train if reductions(p).isdisjoint(test)]
    assert set(kept) <= set(pre)
    assert len(kept) < len(train)  # e.g. a colouring of a single-object test prompt is a train prompt
    assert test.isdisjoint(pre)


@pytest.mark.parametrize("size", (32, 48))
def test_every_caption_renders_to_exactly_its_meaning(size):
    """Every caption (held out or not): the verifier passes its renders, and the scene is what it says."""
    for i, caption in enumerate(C.captions()):
        parsed = C.parse_caption(caption)
        for seed in (i, i + 1000):
            im = C.render_caption(caption, size, seed)
            assert C.score_caption(im, caption) == 1.0 and C.partial_score_caption(im, caption) == 1.0, (caption, seed)
            objs = W.detect(im)
            assert Counter(o.shape for o in objs) == Counter(s for s in parsed.shapes for _ in range(parsed.count))
            for shape, colour in zip(parsed.shapes, parsed.colors):
                if colour is not None:
                    assert sum(o.shape == shape and o.color == colour for o in objs) == parsed.count, caption


def test_benchmark_prompts_render_as_before():
    for prompt in W.prompts("all")[::7]:
        assert np.array_equal(C.render_caption(prompt, 32, 3), W.render(prompt, 32, 3))


def test_the_verifier_checks_the_colours_of_relations_and_counts():
    rel = "a photo of a red square left of a blue circle"
    im = C.render_caption(rel, 32, 0)
    assert C.score_caption(im, "a photo of a blue square left of a red circle") == 0.0
    assert C.score_caption(im, "a photo of a red square right of a blue circle") == 0.0
    assert C.score_caption(im, "a photo of a square left of a blue circle") == 1.0
    # colours right, relation wrong: presence atoms met, the relation atom not
    assert C.partial_score_caption(im, "a photo of a red square right of a blue circle") == pytest.approx(2 / 3)
    assert C.partial_score_caption(im, "a photo of a green square left of a blue circle") == pytest.approx(1 / 3)

    count = "a photo of three red triangles"
    im = C.render_caption(count, 32, 0)
    assert C.score_caption(im, "a photo of three blue triangles") == 0.0
    assert C.score_caption(im, "a photo of two red triangles") == 0.0
    assert C.score_caption(im, "a photo of three triangles") == 1.0
    assert C.partial_score_caption(im, "a photo of three blue triangles") == pytest.approx(0.5)
    assert C.partial_score_caption(im, "a photo of four red triangles") == pytest.approx(0.5 * 0.75 + 0.5)
    mixed = C.render_caption("a photo of three triangles", 32, 5)
    assert len({o.color for o in W.detect(mixed)}) > 1  # not all one colour: fails every coloured count
    assert all(C.score_caption(mixed, f"a photo of three {c} triangles") == 0.0 for c in COLOURS)

    two = "a photo of a yellow circle and a yellow square"
    im = C.render_caption(two, 32, 0)
    assert C.score_caption(im, "a photo of a yellow circle and a green square") == 0.0
    assert C.score_caption(im, "a photo of a circle and a yellow square") == 1.0


def test_tokenizer_reads_every_caption_word_as_one_token():
    tok = build_clip_tokenizer(world_vocabulary(), 16)
    for caption in C.captions():
        assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()], caption
        ids = tok(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= 16
