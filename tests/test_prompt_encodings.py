"""Training prompts are encoded once each: a small set at the start, a large one on first use with a bounded
cache, and a prompt's encoding does not depend on which prompts it was first used with (exact resume)."""

import pytest
import torch

from dgpo.models.handle import load_model
from dgpo.prompt_encodings import PromptEncodings

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle",
           "a photo of a circle left of a square", "a photo of three yellow triangles"]


@pytest.fixture(scope="module")
def model(tiny_base):
    return load_model(tiny_base)


def rows_equal(a, b) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_a_small_set_is_encoded_at_the_start_in_one_batch(model):
    enc = PromptEncodings(model, PROMPTS)
    assert enc.eager and len(enc.cache) == len(PROMPTS)
    with torch.no_grad():
        batch = model.encode_prompts(PROMPTS)
    assert all(rows_equal(enc[p], batch.index(slice(i, i + 1))) for i, p in enumerate(PROMPTS))
    with pytest.raises(KeyError):
        enc["a prompt it was not given"]


def test_a_large_set_is_encoded_on_use_with_a_bounded_cache_the_same_in_any_order(model):
    forwards = PromptEncodings(model, PROMPTS, eager_limit=2, keep=2)
    backwards = PromptEncodings(model, PROMPTS, eager_limit=2, keep=2)
    assert not forwards.eager and not forwards.cache  # nothing encoded before it is used
    first = {p: forwards[p] for p in PROMPTS}
    assert len(forwards.cache) == 2  # the two most recently used are kept
    assert list(forwards.cache) == PROMPTS[-2:]
    for p in reversed(PROMPTS):
        assert rows_equal(backwards[p], first[p])  # the same bits whatever came first
    assert rows_equal(forwards[PROMPTS[0]], first[PROMPTS[0]])  # re-encoded after eviction: the same bits
