"""A world read from a JSON-lines prompt file: bring the published prompt sets (GenEval, OCR, PickScore, ...)
and train on them with any registered reward.

One JSON object per line:

    {"reward": "ocr"}                                                   ← optional first line: the file's reward
    {"prompt": "a sign that says \\"OPEN\\"", "split": "train", "category": "short"}
    {"prompt": "a poster that reads \\"SALE 50%\\"", "split": "test", "category": "long", "any": "metadata"}

``prompt`` is required; ``split`` is ``train`` (the default) or ``test``; ``category`` (default ``all``) groups
the prompts for the task metric; other keys are kept as metadata (``PromptFileWorld.metadata``), which a reward
taking a ``metadata`` argument receives, one dict per image (GenEval's tag and objects, an OCR target). Select it with
the file's path as the world — ``dgpo train --set world=prompts/ocr.jsonl --set model.base=PIPELINE`` — and
the reward with ``reward.name`` or the header line.

The task metric is the reward's mean, each category weighing the same and each prompt the same within its
category (the GenEval aggregation; shown as ``mean <reward>``), with its standard error over fresh images. There
is no quality metric (FD) and no embedded base: ``model.base`` names the pipeline folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dgpo.errors import UserError
from dgpo.worlds.categories import mean_by_category

SPLITS = ("train", "test")


def is_prompt_file(name: str) -> bool:
    """Whether a ``world`` value names a prompt file rather than a registered world."""
    return name.endswith(".jsonl")


class PromptFileWorld:
    """The world of one prompt file (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"prompt file {str(self.path)!r} does not exist (world: a .jsonl file, one "
                            '{"prompt": ..., "split": "train"|"test"} per line)')
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"prompt file {str(self.path)!r} is not UTF-8 text") from None
        self.reward, self.entries = "", []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                entry = json.loads(line)
            except ValueError:
                raise UserError(f"{where}: not JSON: {line[:80]!r}") from None
            if not isinstance(entry, dict):
                raise UserError(f"{where}: expected a JSON object, got {line[:80]!r}")
            if "prompt" not in entry and not self.entries and set(entry) == {"reward"}:
                self.reward = str(entry["reward"])  # the header line
                continue
            prompt, split = entry.get("prompt"), entry.get("split", "train")
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f'{where}: "prompt" must be a non-empty string, got {line[:80]!r}')
            if split not in SPLITS:
                raise UserError(f'{where}: "split" must be "train" or "test", got {split!r}')
            entry.setdefault("split", "train")
            entry["category"] = str(entry.get("category", "all"))
            self.entries.append(entry)
        if not self.entries:
            raise UserError(f"prompt file {str(self.path)!r} has no prompts")
        self._by_prompt = {e["prompt"]: e for e in self.entries}
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.name = f"prompt_file:{digest}"  # what an evaluation cache keys on: the file's content
        self.metric = f"mean {self.reward}" if self.reward else "mean reward"

    def prompts(self, split: str) -> list[str]:
        chosen = [e["prompt"] for e in self.entries if split == "all" or e["split"] == split]
        if not chosen:
            raise UserError(f"prompt file {str(self.path)!r} has no {split!r} prompts")
        return list(dict.fromkeys(chosen))

    def metadata(self, prompt: str) -> dict:
        """The line a prompt came from (its split, category and any other keys)."""
        return self._by_prompt[prompt]

    def category(self, prompt: str) -> str:
        entry = self._by_prompt.get(prompt)
        return entry["category"] if entry else "all"

    def check_prompts(self, prompts: list[str]) -> None:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise UserError(f"empty prompt {p!r}")

    def use_reward(self, name: str, reward) -> None:
        """Evaluate with the run's reward (built with its settings: a model path, a server URL) when the file
        names none, or names the same one."""
        if self.reward in ("", name):
            self.reward, self._scorer = name, reward
            self.metric = f"mean {name}"
            self.name = f"{self.name.split(':reward=')[0]}:reward={name}"  # evaluation caches key on it

    def _reward(self):
        from dgpo.rewards import make_reward
        if not self.reward:
            raise UserError(f'prompt file {str(self.path)!r} names no reward: set reward.name, or start the file '
                            'with a line {"reward": "NAME"}')
        if not hasattr(self, "_scorer"):
            self._scorer = make_reward(self.reward)
        return self._scorer

    def score(self, images: np.ndarray, prompts: list[str], fd: bool = True) -> dict:
        """The reward's mean by category (the module docstring); ``partial`` is the plain mean; no FD."""
        from dgpo.rewards import call_reward
        scores = np.asarray(call_reward(self._reward(), images, prompts, [self.metadata(p) for p in prompts]),
                            dtype=np.float64)
        by_prompt: dict[str, list[float]] = {}
        for p, s in zip(prompts, scores):
            by_prompt.setdefault(p, []).append(float(s))
        result = mean_by_category(by_prompt, self.category)
        return {"geneval": result["overall"], "geneval_se": result["se"], "per_category": result["per_category"],
                "partial": float(scores.mean()) if len(scores) else float("nan"),
                "n_images": len(images), "n_prompts": len(by_prompt)}

    def embedded_base(self, base_config: str, log=print) -> Path:
        raise UserError(f"the world of {str(self.path)!r} has no base model of its own: set model.base to a "
                        "pipeline folder (save_pretrained's layout)")
