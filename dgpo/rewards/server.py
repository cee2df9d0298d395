"""Serve a reward over HTTP: an ASGI app (Starlette) on uvicorn, speaking the remote-reward protocol.

``POST /score`` (``/`` too) with ``{"prompts": [str, ...], "images": [base64 PNG, ...]}`` (and optionally
``"metadata": [object, ...]``, one per prompt, for a reward that takes it) answers
``{"scores": [float, ...]}``; ``GET /`` answers ``{"reward": NAME}`` (a health check). Every refusal is JSON
``{"error": message}`` with its status:

- 400 a malformed request, or one the reward rejects (a prompt outside its grammar, say);
- 401 a missing or wrong bearer token (``Authorization: Bearer TOKEN``), when the server has a token;
- 403 a request from a web page (it carries an ``Origin`` header: our client never sends one, a browser
  always does on a cross-site POST), or a ``Host`` the server does not answer to (DNS rebinding);
- 408 a body that does not arrive within ``body_timeout`` seconds (a client that stalls mid-body);
- 413 a body over ``max_body_bytes`` (said by its Content-Length or counted while it streams), an image over
  ``max_pixels`` or a request over ``max_request_pixels`` in all (read from the PNG headers, before anything is
  decoded), or images whose decoding passes ``decode_seconds``;
- a connection whose request headers are not complete within ``header_timeout`` seconds is closed;
- 500 the reward failed, or answered something that is not one finite number per image.

Images are PNG only; nothing received is ever unpickled. The server binds 127.0.0.1 unless told otherwise,
and refuses to bind another address without a token. Calls to the reward are serialised by a lock (a reward
holding a model on a GPU is rarely thread-safe) and run off the event loop, so the server keeps answering
health checks and refusals while it scores.

    dgpo serve-reward shapes_partial --port 8765                    # in-process reward → http://127.0.0.1:8765/score
    dgpo train --set reward.name=remote --set reward.url=http://127.0.0.1:8765/score
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dgpo.errors import UserError
from dgpo.rewards.protocol import Reward, RewardServerError, call_reward, check_scores

#: Largest request body the server reads (bytes): 1,024 PNGs of 512 × 512 fit with room to spare.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
#: Largest image, in pixels, that the server decodes (a PNG header states its size before decoding): FLUX's 2 MP
#: fit; one image at the limit decodes in about a second on a CPU core.
MAX_IMAGE_PIXELS = 2048 * 2048
#: Largest request, in pixels over all its images (from their headers, before anything is decoded): 32 images of
#: 1024², or 8 of 2048².
MAX_REQUEST_PIXELS = 32 * 1024 * 1024
#: Seconds the server spends decoding one request's images before it refuses the rest of them.
DECODE_SECONDS = 10.0
#: Seconds a client has to deliver its whole request body.
BODY_TIMEOUT_S = 60.0
#: Seconds a client has to deliver a request's headers, from its connection or its previous response.
HEADER_TIMEOUT_S = 10.0


class RequestRefused(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    """What one request may cost the server (each refusal is named in the module's docstring)."""

    max_body_bytes: int = MAX_REQUEST_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    body_timeout: float = BODY_TIMEOUT_S
    max_request_pixels: int = MAX_REQUEST_PIXELS
    decode_seconds: float = DECODE_SECONDS
    header_timeout: float = HEADER_TIMEOUT_S


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def png_of(data: str) -> bytes:
    """The bytes of a base64 string (400 if it is not base64)."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise RequestRefused(400, "not valid base64") from None


def png_size(raw: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from a PNG's header, nothing decoded; 400 for data that is not a PNG, 413 for an image of
    more than ``max_pixels`` pixels (a small file can decode to gigabytes)."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            width, height = im.size
    except Exception as e:  # PIL raises several types for corrupt or unsupported data
        raise RequestRefused(400, f"not a readable PNG ({type(e).__name__})") from None
    if width * height > max_pixels:
        raise RequestRefused(413, f"an image of {width} x {height} pixels is over this server's limit "
                                  f"of {max_pixels} pixels")
    return width, height


def decode_png(raw: bytes) -> np.ndarray:
    """A PNG (its size already checked) → uint8 (H, W, 3)."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise RequestRefused(400, f"not a readable PNG ({type(e).__name__})") from None


def parse_request(raw: bytes, limits: ServerLimits) -> tuple[np.ndarray, list[str], list[dict] | None]:
    """The images (N, H, W, 3), prompts and metadata (one object per prompt, or None) of a request body, or a
    :class:`RequestRefused` saying what is wrong. Every image's size is read from its header before any is
    decoded: an image over ``limits.max_pixels`` or a request over ``limits.max_request_pixels`` in all costs no
    decoding (413); decoding stops once it has taken ``limits.decode_seconds`` (413)."""
    try:
        req = json.loads(raw)
    except ValueError:
        raise RequestRefused(400, "body is not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("prompts"), list) or not isinstance(req.get("images"), list):
        raise RequestRefused(400, 'expected a JSON object {"prompts": [...], "images": [base64 PNG, ...]}')
    prompts, encoded = req["prompts"], req["images"]
    if len(prompts) != len(encoded):
        raise RequestRefused(400, f"{len(encoded)} images but {len(prompts)} prompts")
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(s, str) for s in encoded):
        raise RequestRefused(400, "prompts and images must be lists of strings")
    pngs, total = [], 0
    for i, s in enumerate(encoded):
        try:
            pngs.append(png_of(s))
            width, height = png_size(pngs[-1], limits.max_pixels)
        except RequestRefused as e:
            raise RequestRefused(e.status, f"images[{i}]: {e}") from None
        total += width * height
        if total > limits.max_request_pixels:
            raise RequestRefused(413, f"the request's images hold more than this server's limit of "
                                      f"{limits.max_request_pixels} pixels in all: send them in smaller requests")
    arrays, start = [], time.monotonic()
    for i, png in enumerate(pngs):
        if time.monotonic() - start > limits.decode_seconds:
            raise RequestRefused(413, f"decoding the request's images took over {limits.decode_seconds:g} s "
                                      f"(stopped at images[{i}]): send smaller or fewer images per request")
        try:
            arrays.append(decode_png(png))
        except RequestRefused as e:
            raise RequestRefused(e.status, f"images[{i}]: {e}") from None
    if arrays and len({a.shape for a in arrays}) != 1:
        raise RequestRefused(400, "all images of a request must have the same size")
    images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
    metadata = req.get("metadata")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(prompts)
                                 or not all(isinstance(m, dict) for m in metadata)):
        raise RequestRefused(400, f'"metadata" must be a list of {len(prompts)} objects, one per prompt')
    return images, prompts, metadata


def create_app(reward: Reward, token: str | None = None, allowed_hosts: list[str] | None = None,
               limits: ServerLimits = ServerLimits()):
    """The ASGI app serving ``reward`` (see the module docstring). ``allowed_hosts``: the ``Host`` names it
    answers to (None: any; :func:`serve_reward` passes the loopback names when it binds loopback)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    name = getattr(reward, "name", type(reward).__name__)
    lock = threading.Lock()

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestRefused(400, "Content-Length is not a number")
            if int(declared) > limits.max_body_bytes:
                raise RequestRefused(413, f"request body must be at most {limits.max_body_bytes} bytes")
        chunks, size = [], 0

        async def collect():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise RequestRefused(413, f"request body must be at most {limits.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(collect(), timeout=limits.body_timeout)
        except asyncio.TimeoutError:
            raise RequestRefused(408, f"the request body did not arrive within {limits.body_timeout:g} s") from None
        return b"".join(chunks)

    async def health(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return JSONResponse({"reward": name})

    async def score(request: Request) -> JSONResponse:
        if "origin" in request.headers:
            return refuse(403, "requests from web pages are refused")
        if not authorised(request):
            return refuse(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        try:
            body = await read_body(request)
            images, prompts, metadata = await run_in_threadpool(parse_request, body, limits)  # decoding: off the loop
        except RequestRefused as e:
            return refuse(e.status, f"bad request: {e}" if e.status == 400 else str(e))
        except ClientDisconnect:
            return refuse(400, "the client went away mid-body")

        def call() -> np.ndarray:
            with lock:
                return check_scores(call_reward(reward, images, prompts, metadata), len(prompts), f"reward {name!r}")

        try:
            scores = await run_in_threadpool(call)
        except ValueError as e:  # the reward rejects its input (RewardInputError, a prompt outside its grammar)
            return refuse(400, str(e))
        except RewardServerError as e:  # the reward answered junk
            return refuse(500, str(e))
        except Exception as e:
            return refuse(500, f"reward failed: {type(e).__name__}: {e}")
        return JSONResponse({"scores": [float(s) for s in scores]})

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    routes = [Route("/", health, methods=["GET"]), Route("/", score, methods=["POST"]),
              Route("/score", score, methods=["POST"]), Route("/score", health, methods=["GET"])]
    return Starlette(routes=routes, middleware=middleware)


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]


def check_binding(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address needs a token (a reward server decodes whatever it is sent)."""
    if not is_loopback(host) and not token:
        raise UserError(f"serving on {host!r} exposes the reward to other machines: set DGPO_REWARD_TOKEN (here and "
                        "in the clients; --token would show in ps), or bind 127.0.0.1 and reach it through an SSH tunnel")


class RewardServer:
    """A running server (uvicorn in a daemon thread): ``url``, and ``close()`` to stop it."""

    def __init__(self, server, thread: threading.Thread, url: str):
        self._server, self._thread, self.url = server, thread, url

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete ``seconds`` after it
    opened or after its previous response: uvicorn bounds the headers' size and an idle connection's life, not
    the time a client may take to send them, so a client that trickles headers would hold a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a request's headers have arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's headers: the same bound
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app, host: str, port: int, limits: ServerLimits):
    import uvicorn
    # timeout_keep_alive: idle keep-alive connections close; h11_max_incomplete_event_size bounds the headers;
    # the protocol bounds the time they take
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                          http=header_timeout_protocol(limits.header_timeout))


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 limits: ServerLimits = ServerLimits(), wrap=None) -> RewardServer:
    """Serve ``reward`` in a daemon thread of this process (tests, notebooks); ``port=0`` picks a free port.
    ``wrap``: an ASGI app wrapping the reward's app (``wrap(app)``), e.g. to inject faults in a load test.
    The command ``dgpo serve-reward`` runs the same app in the foreground."""
    import socket
    import uvicorn
    check_binding(host, token)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    app = create_app(reward, token, LOOPBACK_HOSTS if is_loopback(host) else None, limits)
    if wrap is not None:
        app = wrap(app)
    server = uvicorn.Server(uvicorn_config(app, host, port, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"reward-server-{sock.getsockname()[1]}")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the reward server did not start")
        time.sleep(0.01)
    url_host = f"[{host.strip('[]')}]" if ":" in host else host
    return RewardServer(server, thread, f"http://{url_host}:{sock.getsockname()[1]}/score")
