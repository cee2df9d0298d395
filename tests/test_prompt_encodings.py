"""Training prompts are encoded once each: a small set at the start, a large one on first use with a bounded
cache, and a prompt's encoding does not depend on which prompts it was first used with (exact resume)."""

import pytest
import torch

from dgpo.models.families import load_model
from dgpo.models.prompt_encodings import PromptEncodings

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


def test_a_global_batch_makes_the_same_encoder_calls_on_every_process(model):
    """``batch(prompts, rows)`` gives this process's rows, and each process encodes exactly what the others do
    (a sharded text encoder needs every process in each call), however the rows split the prompts."""
    calls = {0: [], 1: []}
    batch = [PROMPTS[i] for i in (0, 1, 0, 2, 3, 3)]  # process 0 owns rows 0, 2, 4; process 1 rows 1, 3, 5
    for rank in (0, 1):
        enc = PromptEncodings(model, PROMPTS, eager_limit=2, keep=2)
        original = model.encode_prompts
        model.encode_prompts = lambda prompts, rank=rank, original=original: calls[rank].append(prompts) or original(prompts)
        try:
            mine = enc.batch(batch, torch.arange(rank, 6, 2))
        finally:
            del model.encode_prompts
        want = [batch[i] for i in range(rank, 6, 2)]
        assert all(rows_equal(mine.index(slice(j, j + 1)), enc[p]) for j, p in enumerate(want))
    assert calls[0] == calls[1] and len(calls[0]) >= 4  # the same encoder calls; each new prompt at least once
