"""Rewards: one protocol, a registry, in-process scorers and a remote (HTTP) scorer.

A reward maps a batch of generated images and their prompts to one float per image::

    reward = make_reward("shapes_partial")
    scores = reward(images, prompts)        # images: uint8 (N, H, W, 3); prompts: N strings → float64 (N,)

Remote scoring protocol (``RemoteReward`` ⇄ ``serve_reward``): the client POSTs
``{"prompts": [str, ...], "images": [base64 PNG, ...]}`` (``Content-Type: application/json``) to the URL and
expects HTTP 200 with ``{"scores": [float, ...]}`` of the same length. Any process that speaks this protocol
can be a reward (a VLM judge on another GPU, an OCR model, ...); :func:`serve_reward` hosts any in-process
:class:`Reward` over it. Only the standard library is used for HTTP, and PNG (via Pillow) for images: no
pickles cross the wire.
"""

from __future__ import annotations

import base64
import http.client
import binascii
import inspect
import io
import ipaddress
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from dgpo.errors import UserError
from dgpo.worlds import shapes

__all__ = [
    "Reward",
    "RewardInputError",
    "RewardServerError",
    "ShapesReward",
    "RemoteReward",
    "serve_reward",
    "make_reward",
    "register_reward",
    "available_rewards",
    "check_scores",
    "encode_png",
    "decode_png",
]

#: Largest request body ``serve_reward`` accepts (bytes).
MAX_REQUEST_BYTES = 256 * 1024 * 1024


class RewardInputError(UserError, ValueError):
    """Images or prompts handed to a reward are malformed (wrong shape/dtype, prompt outside a grammar)."""


class RewardServerError(UserError):
    """A remote reward server is unreachable, too slow, or answered something that is not scores."""


@runtime_checkable
class Reward(Protocol):
    """A reward function over a batch of images.

    Attributes:
        name: short identifier used in logs and metric names (e.g. ``"shapes_partial"``).

    ``reward(images, prompts)``: ``images`` is a uint8 array (N, H, W, 3), ``prompts`` a list of N strings;
    returns a float64 array (N,) of finite scores (higher is better).
    """

    name: str

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------------ checks

def _check_batch(images, prompts, who: str) -> tuple[np.ndarray, list[str]]:
    """Validate a batch: uint8 images (N, H, W, 3) (a list of (H, W, 3) arrays is stacked) and N prompts."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise RewardInputError(f"{who}: prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RewardInputError(f"{who}: prompts[{i}] must be a str, got {type(p).__name__}")
    if isinstance(images, (list, tuple)):
        try:
            images = np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
        except ValueError as e:
            raise RewardInputError(f"{who}: images of different shapes cannot form a batch: {e}") from None
    if not isinstance(images, np.ndarray):
        raise RewardInputError(f"{who}: images must be a uint8 numpy array (N, H, W, 3), "
                               f"got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise RewardInputError(f"{who}: images must have shape (N, H, W, 3) (RGB), got {images.shape}")
    if images.dtype != np.uint8:
        raise RewardInputError(f"{who}: images must be uint8 in [0, 255], got dtype {images.dtype}")
    if len(images) != len(prompts):
        raise RewardInputError(f"{who}: got {len(images)} images but {len(prompts)} prompts; "
                               "pass one prompt per image")
    return images, prompts


def check_scores(scores: Any, n: int, who: str) -> np.ndarray:
    """Scores as a float64 array (n,) of finite numbers, or a :class:`RewardServerError` saying what is wrong.

    Accepts a list or array of real numbers (bools are rejected: they are almost always a bug).
    """
    if isinstance(scores, np.ndarray):
        items = scores.tolist() if scores.ndim == 1 else None
    elif isinstance(scores, (list, tuple)):
        items = list(scores)
    else:
        items = None
    if items is None:
        raise RewardServerError(f"{who} answered garbage: scores must be a list of {n} numbers, "
                                f"got {_short(scores)}")
    if len(items) != n:
        raise RewardServerError(f"{who} answered garbage: {len(items)} scores for {n} images")
    for i, s in enumerate(items):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {_short(s)} is not a number")
        if not math.isfinite(s):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {s} is not finite (NaN/inf)")
    return np.asarray(items, dtype=np.float64).reshape(n)


def _short(x: Any, limit: int = 200) -> str:
    text = x if isinstance(x, str) else repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------ in-process

class ShapesReward:
    """The shapes-world verifier as a reward (``dgpo.worlds.shapes``).

    ``kind="partial"``: the fraction of the prompt's atomic requirements met, in [0, 1] (dense signal);
    ``kind="strict"``: 1.0 when the whole prompt holds, else 0.0 (the GenEval-style pass/fail);
    ``kind="mixed"``: ½·strict + ½·partial: the dense signal of partial credit, plus a bonus for images that
    pass outright (with partial credit alone, the last missing atom is worth no more than the first, and a
    policy can settle on half-right images);
    ``kind="soft"``: the partial score with near-miss credit (``shapes.soft_partial_score``): an object drawn
    just outside its shape's fill band (a square with rounded corners) earns part of its atom, so samples
    that the partial score ties at 0 are ordered — a shaping of ours, not the spec's reward.
    Every prompt is checked against the grammar before any image is scored.
    """

    KINDS = ("partial", "strict", "mixed", "soft")

    def __init__(self, kind: str = "partial"):
        if kind not in self.KINDS:
            raise UserError(f"ShapesReward: kind={kind!r} is not allowed; choose one of {list(self.KINDS)}")
        self.kind = kind
        self.name = f"shapes_{kind}"

    def __repr__(self) -> str:
        return f"ShapesReward(kind={self.kind!r})"

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = _check_batch(images, prompts, self.name)
        for i, p in enumerate(prompts):
            try:
                shapes.parse(p)
            except ValueError as e:
                raise RewardInputError(f"{self.name}: prompts[{i}]: {e}") from None
        if images.shape[1] != images.shape[2]:
            raise RewardInputError(f"{self.name}: the shapes verifier needs square images, got "
                                   f"{images.shape[1]}x{images.shape[2]}")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        if self.kind == "mixed":
            return 0.5 * shapes.score_batch(images, prompts) + 0.5 * shapes.partial_score_batch(images, prompts)
        batch = {"partial": shapes.partial_score_batch, "strict": shapes.score_batch,
                 "soft": shapes.soft_partial_score_batch}[self.kind]
        return np.asarray(batch(images, prompts), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ PNG codec

def encode_png(image: np.ndarray) -> str:
    """One uint8 (H, W, 3) image as a base64 (ASCII) PNG string."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    """A base64 PNG string → uint8 (H, W, 3) array; ``ValueError`` for anything that is not a PNG."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises several types for corrupt/unsupported data
        raise ValueError(f"not a readable PNG ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------------ remote

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RemoteReward:
    """A reward computed by an HTTP server speaking the protocol of this module (see the module docstring).

    Args:
        url: the endpoint, e.g. ``http://127.0.0.1:8765/score``.
        timeout: seconds to wait for a connection and for the answer of one request.
        retries: extra attempts after a *connection* error (refused, reset, DNS), with backoff
            ``backoff · 2^k`` seconds; timeouts and bad answers are not retried (retrying a server that is
            slow or broken only hides the problem).
        backoff: first backoff delay in seconds.
        name: the reward's name in logs (default ``"remote"``).

    Every failure is a :class:`RewardServerError` (a :class:`UserError`) naming the URL and the fix.
    Requests to a loopback host bypass any ``http_proxy`` environment setting.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 name: str = "remote"):
        if not isinstance(url, str):
            raise UserError(f"reward.url must be a string like http://127.0.0.1:8765/score, got {url!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"reward.url {url!r} is not an http(s) URL; "
                            "expected something like http://127.0.0.1:8765/score")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UserError(f"reward.timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"reward.retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise UserError(f"reward.backoff must be >= 0 seconds, got {backoff!r}")
        self.url, self.timeout, self.retries, self.backoff, self.name = url, float(timeout), retries, backoff, name
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, timeout={self.timeout}, retries={self.retries})"

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = _check_batch(images, prompts, f"{self.name} reward")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        body = json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images]}).encode()
        status, text = self._post(body)
        who = f"reward server at {self.url}"
        if status != 200:
            raise RewardServerError(f"{who} answered HTTP {status}: {_short(text)!r} — check the server's log")
        try:
            answer = json.loads(text)
        except ValueError:
            raise RewardServerError(f"{who} answered garbage: not JSON: {_short(text)!r}") from None
        if not isinstance(answer, dict) or "scores" not in answer:
            raise RewardServerError(f'{who} answered garbage: expected a JSON object with "scores", '
                                    f"got {_short(text)!r}")
        return check_scores(answer["scores"], len(images), who)

    def _post(self, body: bytes) -> tuple[int, str]:
        """POST ``body``; return (status, body text). Retries connection errors; raises RewardServerError."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    return resp.status, resp.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as e:           # non-2xx: the server is up and said no
                try:
                    text = e.read().decode("utf-8", errors="replace")
                except Exception:
                    text = ""
                return e.code, text
            except http.client.HTTPException as e:        # not HTTP at all (bad status line, truncated)
                raise RewardServerError(
                    f"reward server at {self.url} answered garbage: not a valid HTTP response "
                    f"({type(e).__name__}: {_short(str(e))}); is reward.url pointing at the reward server?"
                ) from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(reason, TimeoutError):
                    raise RewardServerError(
                        f"reward server at {self.url} did not answer within {self.timeout:g} s; "
                        "check that it is not stuck or overloaded, or raise reward.timeout") from None
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                if isinstance(reason, ConnectionError) and not isinstance(reason, ConnectionRefusedError):
                    raise RewardServerError(
                        f"reward server at {self.url} dropped the connection ({reason}) after "
                        f"{self.retries + 1} attempts; check the server's log (did it crash?)") from None
                raise RewardServerError(
                    f"reward server at {self.url} is not reachable: {reason} (after {self.retries + 1} "
                    "attempts); start it or fix reward.url") from None
        raise AssertionError("unreachable")


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[ThreadingHTTPServer, str]:
    """Serve an in-process reward over the remote protocol, in a daemon thread.

    ``POST /`` (any path) with ``{"prompts": [...], "images": [base64 PNG, ...]}`` → ``{"scores": [...]}``;
    a malformed request or one the reward rejects (e.g. a prompt outside its grammar) gets HTTP 400 with
    ``{"error": message}``, an exception inside the reward HTTP 500. ``GET /`` answers
    ``{"reward": name}`` (a health check). Calls to ``reward`` are serialised by a lock (rewards holding a
    model on a GPU are rarely thread-safe).

    The server binds a loopback address only (it decodes images from whoever connects); to serve other
    machines put it behind an SSH tunnel or a reverse proxy. ``port=0`` picks a free port.

    Returns:
        ``(server, url)``; stop it with ``server.shutdown(); server.server_close()``.
    """
    if not _is_loopback(host):
        raise UserError(f"serve_reward binds loopback addresses only (e.g. 127.0.0.1), got host={host!r}; "
                        "reach it from other machines through an SSH tunnel or a reverse proxy")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet by default (tests, training logs)
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._reply(200, {"reward": getattr(reward, "name", type(reward).__name__)})

        def do_POST(self):  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length header required"})
            if length < 0 or length > MAX_REQUEST_BYTES:
                self.close_connection = True
                return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   {"error": f"request body must be at most {MAX_REQUEST_BYTES} bytes"})
            try:
                images, prompts = self._parse(self.rfile.read(length))
            except ValueError as e:
                return self._reply(400, {"error": f"bad request: {e}"})
            try:
                with lock:
                    scores = reward(images, prompts)
                scores = check_scores(scores, len(prompts), f"reward {getattr(reward, 'name', '?')!r}")
            except (ValueError, RewardServerError) as e:  # bad input (ValueError) or a reward returning junk
                status = 400 if isinstance(e, ValueError) else 500
                return self._reply(status, {"error": str(e)})
            except Exception as e:
                return self._reply(500, {"error": f"reward failed: {type(e).__name__}: {e}"})
            self._reply(200, {"scores": [float(s) for s in scores]})

        @staticmethod
        def _parse(raw: bytes) -> tuple[np.ndarray, list[str]]:
            try:
                req = json.loads(raw)
            except ValueError:
                raise ValueError("body is not JSON") from None
            if not isinstance(req, dict) or not isinstance(req.get("prompts"), list) \
                    or not isinstance(req.get("images"), list):
                raise ValueError('expected a JSON object {"prompts": [...], "images": [base64 PNG, ...]}')
            prompts, encoded = req["prompts"], req["images"]
            if len(prompts) != len(encoded):
                raise ValueError(f"{len(encoded)} images but {len(prompts)} prompts")
            if not all(isinstance(p, str) for p in prompts) or not all(isinstance(s, str) for s in encoded):
                raise ValueError("prompts and images must be lists of strings")
            arrays = []
            for i, s in enumerate(encoded):
                try:
                    arrays.append(decode_png(s))
                except ValueError as e:
                    raise ValueError(f"images[{i}]: {e}") from None
            if arrays and len({a.shape for a in arrays}) != 1:
                raise ValueError("all images of a request must have the same size")
            images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
            return images, prompts

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"reward-server-{server.server_port}", daemon=True)
    thread.start()
    url_host = f"[{host}]" if ":" in host else host
    return server, f"http://{url_host}:{server.server_port}/"


# ------------------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., Reward]] = {
    "shapes_partial": lambda: ShapesReward(kind="partial"),
    "shapes_strict": lambda: ShapesReward(kind="strict"),
    "shapes_mixed": lambda: ShapesReward(kind="mixed"),
    "shapes_soft": lambda: ShapesReward(kind="soft"),
    "remote": RemoteReward,
}


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def register_reward(name: str, factory: Callable[..., Reward], overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Reward`` under ``name`` so that configs can say ``reward.name: NAME``.

    Raises ``UserError`` if the name is taken (unless ``overwrite``) or the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_reward: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise UserError(f"register_reward: factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise UserError(f"register_reward: a reward named {name!r} is already registered; "
                        "pick another name or pass overwrite=True")
    _REGISTRY[name] = factory


def reward_of_run(reward_cfg, world) -> tuple[str, Reward]:
    """The reward a training run's ``reward:`` section names (:class:`dgpo.train_config.RewardConfig`): its
    ``name``, or the world's own when empty, built with the section's ``url``/``timeout`` for ``remote``."""
    name = reward_cfg.name or world.reward
    options = {"url": reward_cfg.url, "timeout": reward_cfg.timeout} if name == "remote" else {}
    return name, make_reward(name, **options)


def make_reward(name: str, **kwargs) -> Reward:
    """Build a registered reward: ``"shapes_partial"``, ``"shapes_strict"``, ``"shapes_mixed"``,
    ``"shapes_soft"``, ``"remote"`` (needs ``url=``)
    or any name added with :func:`register_reward`. Unknown names and options are ``UserError``s."""
    if name not in _REGISTRY:
        raise UserError(f"unknown reward {name!r}; allowed names: {available_rewards()} "
                        "(add your own with dgpo.rewards.register_reward)")
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        hint = " (the remote reward needs url=http://HOST:PORT/...)" if name == "remote" else ""
        raise UserError(f"reward {name!r}: bad options {sorted(kwargs)}: {e}{hint}") from None
    except ValueError:  # a builtin without a signature: let the call itself complain
        pass
    return factory(**kwargs)
