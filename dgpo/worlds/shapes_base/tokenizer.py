"""A CLIP BPE tokenizer built locally from a closed vocabulary of words (no hub download).

CLIP's BPE splits a word into characters, the last one suffixed ``</w>``, then repeatedly merges the
adjacent pair of lowest rank. A single left-to-right chain of merges per word is not enough: a pair from
another word's chain (``a n`` from "and") can fire first inside "triangle" and strand it in pieces. So for
each vocabulary word we add *every* split of *every* substring as a merge: whichever adjacent pieces
merge first, the pieces stay substrings of the word and can always merge further, so every word of the
grammar ends as one token. All single characters are in the vocabulary too, so an unexpected word still tokenizes (to
pieces) instead of mapping to an unknown token.
"""

from __future__ import annotations

import string
from typing import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _all_merges(word: str) -> list[tuple[str, str]]:
    """Every (left, right) split of every substring of ``word`` (right end marked ``</w>``)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    for length in range(2, len(symbols) + 1):
        for start in range(len(symbols) - length + 1):
            for cut in range(start + 1, start + length):
                merges.append(("".join(symbols[start:cut]), "".join(symbols[cut:start + length])))
    return merges


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token → id) and BPE merges for a closed set of lowercase words."""
    words = sorted({w.lower() for w in words if w})
    tokens = [BOS, EOS]
    for ch in string.ascii_lowercase + string.digits + "!,.'-":
        tokens += [ch, ch + "</w>"]
    merges: list[tuple[str, str]] = []
    for word in words:
        for left, right in _all_merges(word):
            merged = left + right
            if merged not in tokens:
                tokens.append(merged)
            rule = (left, right)
            if rule not in merges:
                merges.append(rule)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer over ``words`` whose sequences are padded/truncated to ``max_length``."""
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                        unk_token=EOS, model_max_length=max_length)
    return tok
