"""A reward judged by a vision-language model behind an OpenAI-compatible chat-completions server.

vLLM (``vllm serve MODEL``) and SGLang serve UnifiedReward, Qwen2.5-VL and other judges behind
``POST {url}/chat/completions``. :class:`VLMJudge` sends each image with its prompt as one chat request — the
image as a base64 PNG data URL, the question from a template — asks for a score on a stated scale, parses the
number out of the answer, and returns it rescaled to [0, 1]. Requests go out concurrently (``concurrency``)
and come back in the batch's order; a connection error, a timeout or HTTP 429/502/503/504 is retried with
backoff, and every other failure — the server down, refusing the key, an answer without a score or with one
off the scale — is one :class:`dgpo.rewards.RewardServerError` naming the server and quoting the answer.

    vllm serve CodeGoat24/UnifiedReward-qwen-7b --port 8000                  # on the judge's GPU
    dgpo train --set reward.name=vlm_judge --set reward.url=http://127.0.0.1:8000/v1 \\
               --set reward.model=CodeGoat24/UnifiedReward-qwen-7b

The API key, when the server wants one, is read from ``DGPO_JUDGE_API_KEY`` (never from a config file).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dgpo.errors import UserError
from dgpo.rewards.client import Retry, with_retries
from dgpo.rewards.protocol import RewardServerError, check_batch, shortened, encode_png

#: Environment variable the judge's API key is read from.
API_KEY_ENV = "DGPO_JUDGE_API_KEY"
#: The question asked about every image; ``{prompt}``, ``{low}`` and ``{high}`` are filled in.
DEFAULT_TEMPLATE = ("You are judging an AI-generated image for the caption: \"{prompt}\". Rate how well the image "
                    "matches the caption and how good it looks, from {low} (not at all) to {high} (perfectly). "
                    "Think briefly, then end your answer with a line of the form 'Score: N'.")
#: "Score: 7", "Final Score: 4.5", "score = 8/10": the number after the last "score".
SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
RETRY_STATUSES = (429, 502, 503, 504)


def parse_score(answer: str) -> float | None:
    """The number after the last "score" in ``answer`` (None if there is none)."""
    found = SCORE.findall(answer)
    return float(found[-1]) if found else None


class VLMJudge:
    """A reward from a chat-completions VLM judge (see the module docstring).

    Args:
        url: the server's API base, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the served model's name (what the server's ``/v1/models`` lists).
        template: the question, with ``{prompt}``, ``{low}``, ``{high}``.
        scale: the (low, high) the judge is asked to score on; scores are returned as (s − low)/(high − low).
        timeout, retries, backoff: per request; a retry waits ``backoff · 2^k`` seconds.
        concurrency: requests in flight at once.
        max_tokens: the longest answer asked for (a judge that thinks aloud needs a few hundred).
    """

    name = "vlm_judge"

    def __init__(self, url: str, model: str, template: str = DEFAULT_TEMPLATE, scale: tuple[float, float] = (1, 10),
                 timeout: float = 60.0, retries: int = 2, backoff: float = 0.5, concurrency: int = 8,
                 max_tokens: int = 512):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"reward.url must be the judge server's API base, e.g. http://127.0.0.1:8000/v1, "
                            f"got {url!r}")
        if not model:
            raise UserError("reward 'vlm_judge' needs the served model's name: --set reward.model=NAME (as the "
                            "server's /v1/models lists it)")
        low, high = scale
        if not low < high:
            raise UserError(f"vlm_judge: the score scale must be (low, high) with low < high, got {scale}")
        for field in ("{prompt}",):
            if field not in template:
                raise UserError(f"vlm_judge: the template must contain {field}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.template, self.scale = model, template, (float(low), float(high))
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self._client = None

    def __repr__(self) -> str:
        return f"VLMJudge(url={self.endpoint!r}, model={self.model!r})"

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = check_batch(images, prompts, "vlm_judge reward")
        if len(images) == 0:
            return np.zeros(0)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(images))) as pool:
            raw = list(pool.map(self.judge, images, prompts))
        low, high = self.scale
        return (np.asarray(raw, dtype=np.float64) - low) / (high - low)

    def request(self, image: np.ndarray, prompt: str) -> dict:
        """The chat-completions request for one image (OpenAI's vision message format)."""
        low, high = self.scale
        question = self.template.format(prompt=prompt, low=f"{low:g}", high=f"{high:g}")
        return {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_png(image)}},
                    {"type": "text", "text": question}]}]}

    def judge(self, image: np.ndarray, prompt: str) -> float:
        """One image's score on the judge's scale, retried as the module docstring says."""
        body = json.dumps(self.request(image, prompt)).encode()
        return with_retries(lambda attempt: self._post(body), self.retries, self.backoff)

    def _post(self, body: bytes) -> float:
        import httpx
        who = f"VLM judge at {self.endpoint}"
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, trust_env=False)
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        try:
            resp = self._client.post(self.endpoint, content=body, headers=headers)
        except httpx.TimeoutException:
            raise Retry(f"{who} did not answer within {self.timeout:g} s; raise reward.timeout for a slow "
                         "judge") from None
        except httpx.TransportError as e:
            raise Retry(f"{who} is not reachable ({type(e).__name__}); start the server or fix reward.url") from None
        if resp.status_code in RETRY_STATUSES:
            raise Retry(f"{who} is overloaded or restarting (HTTP {resp.status_code})")
        if resp.status_code in (401, 403):
            raise RewardServerError(f"{who} refused the request (HTTP {resp.status_code}): set its API key in "
                                    f"{API_KEY_ENV}")
        if resp.status_code != 200:
            raise RewardServerError(f"{who} answered HTTP {resp.status_code}: {shortened(resp.text)!r}")
        try:
            answer = resp.json()["choices"][0]["message"]["content"]
            if isinstance(answer, list):  # content parts
                answer = " ".join(part.get("text", "") for part in answer if isinstance(part, dict))
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardServerError(f"{who} answered something that is not a chat completion: "
                                    f"{shortened(resp.text)!r}") from None
        score = parse_score(answer or "")
        low, high = self.scale
        if score is None:
            raise RewardServerError(f"{who} gave no 'Score: N' in its answer: {shortened(answer)!r}; check "
                                    "reward.model and the template")
        if not low <= score <= high:
            raise RewardServerError(f"{who} scored {score:g}, off the scale {low:g}–{high:g}: {shortened(answer)!r}")
        return score

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
