"""The text encodings of a training prompt set, each computed once and shared by every step that needs it.

A small set (the shapes world's 93 train prompts) is encoded at the start, in one batch. A large one cannot be:
a GenEval or OCR training file holds tens of thousands of prompts, and SD3.5's encodings (333 tokens × 4096
floats, 5.5 MB each in fp32) would take hundreds of GB at once. Its prompts are encoded on first use, one prompt
per encoder call, and the ``keep`` most recently used are kept. Encoding one prompt at a time makes a prompt's
encoding the same whichever prompts it is first used with, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from dgpo.models.handle import PromptEmbeds

#: Sets up to this size are encoded at the start, in one batch.
EAGER_LIMIT = 2048


class PromptEncodings:
    """``encodings[prompt]`` → that prompt's :class:`PromptEmbeds` (one row), for the prompts of ``prompts``."""

    def __init__(self, model, prompts: list[str], eager_limit: int = EAGER_LIMIT, keep: int = 1024):
        self.model, self.keep = model, keep
        self.prompts = list(dict.fromkeys(prompts))
        self.eager = len(self.prompts) <= eager_limit
        self.cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        if self.eager:
            with torch.no_grad():
                embeds = model.encode_prompts(self.prompts)
            self.cache.update((p, embeds.index(slice(i, i + 1))) for i, p in enumerate(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, prompts: list[str], rows: torch.Tensor | None = None) -> PromptEmbeds:
        """The encodings of a global batch's ``prompts`` at ``rows`` (this process's rows; all when None). Every
        prompt of the whole batch is looked up, in order, so every process makes the same encoder calls and keeps
        the same cache: a sharded text encoder (:mod:`dgpo.runtime.sharding`) needs every process in each call."""
        embeds = [self[p] for p in prompts]
        return PromptEmbeds.cat([embeds[i] for i in (range(len(prompts)) if rows is None else rows.tolist())])

    def __getitem__(self, prompt: str) -> PromptEmbeds:
        if prompt in self.cache:
            if not self.eager:
                self.cache.move_to_end(prompt)
            return self.cache[prompt]
        if self.eager:
            raise KeyError(f"{prompt!r} is not one of the training prompts")
        with torch.no_grad():
            embeds = self.model.encode_prompts([prompt])
        self.cache[prompt] = embeds
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return embeds
