"""The remote reward: score images on one or more reward servers over HTTP (httpx).

A batch is cut into chunks of at most ``batch_size`` images; the chunks go out concurrently, spread over the
server URLs in turn, and their scores come back in the batch's order. A chunk that meets a connection error, a
timeout or an overloaded server (HTTP 502/503/504) is sent again — to the next URL — after a backoff of
``backoff · 2^k`` seconds, at most ``retries`` times; scoring is a pure function of the request, so a retry
never counts an image twice. Every failure ends in one :class:`dgpo.rewards.RewardServerError` naming the
server and the fix: down, slow, refusing the token, or answering garbage (not JSON, the wrong number of
scores, a non-finite score). Answers are read up to ``max_answer_bytes``.

Protocol: :mod:`dgpo.rewards.server`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dgpo.errors import UserError
from dgpo.rewards.server import is_loopback
from dgpo.rewards.protocol import RewardServerError, check_batch, shortened, check_scores, encode_png

RETRY_STATUSES = (502, 503, 504)
#: Environment variable a client reads its bearer token from when none is configured.
TOKEN_ENV = "DGPO_REWARD_TOKEN"


class Retry(Exception):
    """A failure worth another attempt (down, slow, overloaded); ``message`` is what the user sees at the end."""


def with_retries(send, retries: int, backoff: float):
    """``send(attempt)`` until it returns, again after each :class:`Retry` (waiting ``backoff · 2^k`` seconds),
    at most ``retries`` more times; then a :class:`RewardServerError` with the last failure's message."""
    last = ""
    for attempt in range(retries + 1):
        try:
            return send(attempt)
        except Retry as e:
            last = str(e)
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    raise RewardServerError(f"{last} (after {retries + 1} attempts)")


class RemoteReward:
    """A reward computed by HTTP reward servers (see the module docstring).

    Args:
        url: the endpoint (``http://127.0.0.1:8765/score``), or several separated by commas / a list.
        timeout: seconds for a connection and for each answer.
        retries: further attempts of a chunk after a connection error, a timeout or HTTP 502/503/504.
        backoff: the first backoff delay in seconds (doubled each retry).
        batch_size: images per request (0: the whole batch in one).
        token: bearer token (default: the ``DGPO_REWARD_TOKEN`` environment variable, if set).
        max_answer_bytes: the longest answer read.
        score_range: ``(low, high)`` every score must lie in (empty: any finite number).
    """

    name = "remote"

    def __init__(self, url, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5, batch_size: int = 0,
                 token: str | None = None, max_answer_bytes: int = 1 << 20, name: str = "remote", score_range=()):
        urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url) if isinstance(url, (list, tuple)) else None
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise UserError(f"reward.url must be a URL like http://127.0.0.1:8765/score (or several, comma-separated), "
                            f"got {url!r}")
        for u in urls:
            parts = urllib.parse.urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UserError(f"reward.url {u!r} is not an http(s) URL; expected something like "
                                "http://127.0.0.1:8765/score")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UserError(f"reward.timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"reward.retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise UserError(f"reward.backoff must be >= 0 seconds, got {backoff!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise UserError(f"reward.batch_size must be an integer >= 0, got {batch_size!r}")
        self.urls, self.timeout, self.retries, self.backoff = urls, float(timeout), retries, float(backoff)
        self.batch_size, self.max_answer_bytes, self.name = batch_size, max_answer_bytes, name
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self._clients: dict[str, object] = {}
        score_range = list(score_range or ())
        if score_range and (len(score_range) != 2 or not score_range[0] < score_range[1]):
            raise UserError(f"reward.score_range must be [low, high] with low < high, got {score_range}")
        self.score_range = score_range

    def __repr__(self) -> str:
        return f"RemoteReward(url={','.join(self.urls)!r}, timeout={self.timeout}, retries={self.retries})"

    def _client(self, url: str):
        import httpx
        if url not in self._clients:  # a loopback server is reached directly, whatever http_proxy says
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._clients[url] = httpx.Client(timeout=self.timeout, headers=headers,
                                              trust_env=not is_loopback(urllib.parse.urlsplit(url).hostname))
        return self._clients[url]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None) -> np.ndarray:
        """Scores of ``images`` for ``prompts``; ``metadata`` (one JSON-able dict per prompt) travels with them
        for a served reward that takes it."""
        images, prompts = check_batch(images, prompts, f"{self.name} reward")
        n = len(images)
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        size = self.batch_size or n
        chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        meta = (lambda c: metadata[c]) if metadata is not None else (lambda c: None)  # noqa: E731
        if len(chunks) == 1:
            return self._score(images[chunks[0]], prompts[chunks[0]], 0, meta(chunks[0]))
        with ThreadPoolExecutor(max_workers=min(len(chunks), 4 * len(self.urls))) as pool:
            parts = pool.map(lambda k: self._score(images[chunks[k]], prompts[chunks[k]], k, meta(chunks[k])),
                             range(len(chunks)))
            return np.concatenate(list(parts))

    def _score(self, images: np.ndarray, prompts: list[str], first_url: int,
               metadata: list[dict] | None = None) -> np.ndarray:
        request = {"prompts": prompts, "images": [encode_png(im) for im in images]}
        if metadata is not None:
            request["metadata"] = metadata
        body = json.dumps(request).encode()
        return with_retries(lambda attempt: self._post(self.urls[(first_url + attempt) % len(self.urls)], body,
                                                       len(images)), self.retries, self.backoff)

    def _post(self, url: str, body: bytes, n: int) -> np.ndarray:
        import httpx
        who = f"reward server at {url}"
        try:
            with self._client(url).stream("POST", url, content=body,
                                          headers={"Content-Type": "application/json"}) as resp:
                text = self._read(resp, who)
                status = resp.status_code
        except httpx.TimeoutException:
            raise Retry(f"{who} did not answer within {self.timeout:g} s; check that it is not stuck or "
                         "overloaded, or raise reward.timeout") from None
        except httpx.RemoteProtocolError as e:
            raise RewardServerError(f"{who} answered garbage: not a valid HTTP response ({shortened(str(e))}); "
                                    "is reward.url pointing at the reward server?") from None
        except httpx.TransportError as e:
            raise Retry(f"{who} is not reachable ({type(e).__name__}: {shortened(str(e))}); start it or fix "
                         "reward.url") from None
        if status in RETRY_STATUSES:
            raise Retry(f"{who} is overloaded or restarting (HTTP {status})")
        if status in (401, 403):
            raise RewardServerError(f"{who} refused the request (HTTP {status}: {shortened(text)}); set the server's "
                                    f"token in reward.token or {TOKEN_ENV}")
        if status != 200:
            raise RewardServerError(f"{who} answered HTTP {status}: {shortened(text)!r} — check the server's log")
        try:
            answer = json.loads(text)
        except ValueError:
            raise RewardServerError(f"{who} answered garbage: not JSON: {shortened(text)!r}") from None
        if not isinstance(answer, dict) or "scores" not in answer:
            raise RewardServerError(f'{who} answered garbage: expected a JSON object with "scores", '
                                    f"got {shortened(text)!r}")
        scores = check_scores(answer["scores"], n, who)
        if self.score_range:
            low, high = self.score_range
            outside = np.flatnonzero((scores < low) | (scores > high))
            if outside.size:
                i = int(outside[0])
                raise RewardServerError(f"{who} answered scores[{i}] = {scores[i]:g}, outside reward.score_range "
                                        f"[{low:g}, {high:g}] ({outside.size} of {n}): is it the reward you meant?")
        return scores

    def _read(self, resp, who: str) -> str:
        data = bytearray()
        for chunk in resp.iter_bytes():
            data += chunk
            if len(data) > self.max_answer_bytes:
                raise RewardServerError(f"{who} answered more than {self.max_answer_bytes} bytes; is reward.url "
                                        "pointing at the reward server?")
        return data.decode("utf-8", errors="replace")
