"""Served rewards: dgpo.rewards.server (Starlette on uvicorn) and dgpo.rewards.client (httpx) end to end — the
same scores as in process, batching over several servers, and one clear error for a server that is down,
slow, overloaded, refuses the token or answers garbage; the server refuses what it must (web pages, foreign
hosts, oversized bodies and images, stalled bodies, missing tokens)."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import httpx
import numpy as np
import pytest
from PIL import Image

from dgpo.errors import UserError
from dgpo.rewards.client import RemoteReward
from dgpo.rewards.server import ServerLimits, serve_reward
from dgpo.rewards import ShapesReward, encode_png, make_reward
from dgpo.worlds import shapes
from conftest import http_stub

PROMPTS = ["a photo of a circle", "a photo of three squares", "a photo of a red triangle",
           "a photo of a square left of a circle", "a photo of a blue circle and a yellow triangle"]


@pytest.fixture(scope="module")
def renders():
    images = np.stack([shapes.render(p, 32, seed) for seed, p in enumerate(PROMPTS)])
    images[1] = 0  # one failure so the scores are not all equal
    return images


@pytest.fixture
def shapes_server():
    with serve_reward(ShapesReward("partial")) as server:
        yield server.url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body: bytes, **headers) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers, timeout=5.0, trust_env=False)


def _request(images, prompts) -> bytes:
    return json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images]}).encode()


# ------------------------------------------------------------------------------------------- end to end

def test_remote_matches_in_process(shapes_server, renders):
    remote = RemoteReward(shapes_server, timeout=5.0)
    got = remote(renders, PROMPTS)
    assert got.dtype == np.float64 and got.tolist()[1] == 0.0
    np.testing.assert_array_equal(got, ShapesReward("partial")(renders, PROMPTS))
    # the server's 400 (a prompt outside the grammar) comes back quoted in one UserError
    with pytest.raises(UserError, match="HTTP 400.*a photo of a dragon"):
        remote(renders[:1], ["a photo of a dragon"])
    assert httpx.get(shapes_server, trust_env=False).json() == {"reward": "shapes_partial"}


def test_batches_spread_over_servers_keep_their_order(renders):
    calls = {"a": 0, "b": 0}

    def counting(tag):
        class Counting(ShapesReward):
            def __call__(self, images, prompts):
                calls[tag] += 1
                return super().__call__(images, prompts)
        return Counting("partial")

    with serve_reward(counting("a")) as a, serve_reward(counting("b")) as b:
        remote = RemoteReward(f"{a.url},{b.url}", batch_size=2)
        images, prompts = np.concatenate([renders] * 3), PROMPTS * 3   # 15 images: 8 chunks
        np.testing.assert_array_equal(remote(images, prompts), ShapesReward("partial")(images, prompts))
    assert calls == {"a": 4, "b": 4}


def test_a_server_that_is_down_is_skipped_for_the_next(renders):
    down = f"http://127.0.0.1:{_free_port()}/score"
    with serve_reward(ShapesReward("partial")) as up:
        remote = RemoteReward([down, up.url], retries=1, backoff=0.0)
        np.testing.assert_array_equal(remote(renders, PROMPTS), ShapesReward("partial")(renders, PROMPTS))


# ------------------------------------------------------------------------------------------- client errors

def test_remote_not_reachable():
    """A refused connection is retried after each backoff and then reported, without waiting for the answer
    timeout (10 s, so that a slow or loaded machine stays far below it: 0.25 s measured, 20x under the
    bound of half a timeout)."""
    url = f"http://127.0.0.1:{_free_port()}/score"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"not reachable.*reward.url.*after 3 attempts") as info:
        RemoteReward(url, timeout=10.0, retries=2, backoff=0.05)(np.zeros((1, 8, 8, 3), np.uint8), ["x"])
    assert url in str(info.value)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 5.0, elapsed  # two backoffs: 0.05 + 0.1 s; not one timeout


GARBAGE = {
    "not_json": (200, b"<html>hello</html>", "not JSON"),
    "no_scores": (200, b'{"result": [1.0]}', '"scores"'),
    "wrong_length": (200, b'{"scores": [1.0, 0.0, 1.0]}', "3 scores for 2 images"),
    "nan": (200, b'{"scores": [NaN, 1.0]}', "not finite"),
    "not_numbers": (200, b'{"scores": ["high", 1.0]}', "is not a number"),
    "http_500": (500, b"Traceback: CUDA out of memory" + b"x" * 500, "HTTP 500.*CUDA out of memory"),
    "token": (401, b'{"error": "missing or wrong bearer token"}', "refused the request.*DGPO_REWARD_TOKEN"),
    "huge": (200, b'{"scores": [' + b"1.0, " * 300_000 + b"1.0]}", "more than 1048576 bytes"),
}


@pytest.fixture
def stub_server():
    """A misbehaving server: answers ``state["answer"]`` = (status, body) after ``state["delay"]`` seconds, or
    one answer per request from ``state["answers"]``; counts the requests."""
    state = {"answer": (200, b"{}"), "delay": 0.0, "answers": [], "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"] += 1
            time.sleep(state["delay"])
            status, body = state["answers"].pop(0) if state["answers"] else state["answer"]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_stub(Handler) as port:
        state["url"] = f"http://127.0.0.1:{port}/"
        yield state


@pytest.mark.parametrize("case", list(GARBAGE))
def test_remote_garbage_answers(stub_server, case):
    status, body, pattern = GARBAGE[case]
    stub_server["answer"] = (status, body)
    with pytest.raises(UserError, match=pattern) as info:
        RemoteReward(stub_server["url"], timeout=5.0)(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
    message = str(info.value)
    assert stub_server["url"] in message and len(message) < 500  # a body is quoted, never whole
    assert stub_server["requests"] == 1  # a server that answers is not asked again


def test_remote_timeout_is_retried_then_named(stub_server):
    stub_server["answer"], stub_server["delay"] = (200, b'{"scores": [1.0]}'), 0.6
    with pytest.raises(UserError, match=r"did not answer within 0.2 s.*reward.timeout.*after 2 attempts"):
        RemoteReward(stub_server["url"], timeout=0.2, retries=1, backoff=0.0)(np.zeros((1, 8, 8, 3), np.uint8), ["a"])
    assert stub_server["requests"] == 2


def test_an_overloaded_server_is_retried_and_no_score_is_counted_twice(stub_server):
    stub_server["answers"] = [(503, b"busy"), (502, b"restarting")]
    stub_server["answer"] = (200, b'{"scores": [0.25, 0.75]}')
    got = RemoteReward(stub_server["url"], retries=2, backoff=0.0)(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
    assert got.tolist() == [0.25, 0.75] and stub_server["requests"] == 3


def test_bad_client_settings_are_one_line():
    for kwargs, pattern in [({"url": "localhost:8000"}, "not an http"), ({"url": ""}, "reward.url"),
                            ({"url": "http://a/", "timeout": 0}, "timeout"),
                            ({"url": "http://a/", "batch_size": -1}, "batch_size")]:
        with pytest.raises(UserError, match=pattern):
            RemoteReward(**kwargs)
    assert make_reward("remote", url="http://127.0.0.1:1/", timeout=1.0).timeout == 1.0


# ------------------------------------------------------------------------------------------- server refusals

def test_the_server_refuses_malformed_requests(shapes_server):
    for body in (b"not json", json.dumps({"prompts": ["a photo of a circle"], "images": ["!!notbase64"]}).encode(),
                 json.dumps({"prompts": ["a"], "images": []}).encode()):
        answer = _post(shapes_server, body)
        assert answer.status_code == 400 and "bad request" in answer.json()["error"]


def test_a_token_is_required_when_the_server_has_one(renders):
    with serve_reward(ShapesReward("partial"), token="s3cret") as server:
        body = _request(renders[:1], PROMPTS[:1])
        assert _post(server.url, body).status_code == 401
        assert _post(server.url, body, Authorization="Bearer wrong").status_code == 401
        assert _post(server.url, body, Authorization="Bearer s3cret").status_code == 200
        with pytest.raises(UserError, match="refused the request"):
            RemoteReward(server.url)(renders[:1], PROMPTS[:1])
        assert RemoteReward(server.url, token="s3cret")(renders[:1], PROMPTS[:1]).shape == (1,)


def test_other_addresses_need_a_token():
    with pytest.raises(UserError, match="--token"):
        serve_reward(ShapesReward(), host="0.0.0.0")


def test_web_pages_and_foreign_hosts_are_refused(shapes_server, renders):
    body = _request(renders[:1], PROMPTS[:1])
    assert _post(shapes_server, body, Origin="http://evil.example").status_code == 403
    assert _post(shapes_server, body, Host="evil.example").status_code == 400  # DNS rebinding: not our name
    assert _post(shapes_server, body).status_code == 200


def test_bodies_and_images_are_bounded(renders):
    limits = ServerLimits(max_body_bytes=20_000, max_pixels=64 * 64, body_timeout=0.5)
    with serve_reward(ShapesReward("partial"), limits=limits) as server:
        assert _post(server.url, b"x" * 30_000).status_code == 413
        # a small PNG that would decode to 16 megapixels is refused from its header, before decoding
        buf = io.BytesIO()
        Image.new("RGB", (4096, 4096)).save(buf, format="PNG")
        assert len(buf.getvalue()) < 60_000
        bomb = json.dumps({"prompts": ["a photo of a circle"],
                           "images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
        limits_big_body = ServerLimits(max_body_bytes=1 << 20, max_pixels=64 * 64)
        with serve_reward(ShapesReward("partial"), limits=limits_big_body) as roomy:
            answer = _post(roomy.url, bomb)
            assert answer.status_code == 413 and "4096 x 4096" in answer.json()["error"]
        # a client that stalls mid-body is cut off after body_timeout
        host, port = server.url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"prompts\"")
            start = time.monotonic()
            reply = sock.recv(4096)
            elapsed = time.monotonic() - start
            # about 0.5 s measured; the bound leaves a slow or loaded machine 20 × body_timeout
            assert b"408" in reply.split(b"\r\n")[0] and elapsed < 10, (reply[:80], elapsed)


def test_a_request_is_bounded_in_pixels_over_all_its_images_before_any_decoding(renders, monkeypatch):
    """Three 32² images against a budget of two: 413 from the headers alone (nothing decoded); two pass."""
    import dgpo.rewards.server as S
    decoded = []
    real = S.decode_png
    monkeypatch.setattr(S, "decode_png", lambda raw: (decoded.append(1), real(raw))[1])
    with serve_reward(ShapesReward("partial"), limits=ServerLimits(max_request_pixels=2 * 32 * 32)) as server:
        answer = _post(server.url, _request(renders[:3], PROMPTS[:3]))
        assert answer.status_code == 413 and "in all" in answer.json()["error"] and decoded == []
        assert _post(server.url, _request(renders[:2], PROMPTS[:2])).status_code == 200


def test_decoding_stops_past_its_time_budget(renders, monkeypatch):
    """Images that take long to decode (0.3 s each here): past decode_seconds (0.5) the rest are refused, 413."""
    import dgpo.rewards.server as S
    real = S.decode_png
    monkeypatch.setattr(S, "decode_png", lambda raw: (time.sleep(0.3), real(raw))[1])
    with serve_reward(ShapesReward("partial"), limits=ServerLimits(decode_seconds=0.5)) as server:
        answer = _post(server.url, _request(renders, PROMPTS))
        assert answer.status_code == 413 and "stopped at images[2]" in answer.json()["error"]
        assert _post(server.url, _request(renders[:1], PROMPTS[:1])).status_code == 200


def _read_response(sock) -> bytes:
    """One whole HTTP response from ``sock`` (headers, then Content-Length bytes of body), however it is split."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_client_that_never_finishes_its_headers_is_cut_off(renders):
    """A connection that sends half its headers is closed after header_timeout (0.5 s), on a fresh connection and
    after a first request on a kept-alive one; a whole request meanwhile is answered."""
    with serve_reward(ShapesReward("partial"), limits=ServerLimits(header_timeout=0.5)) as server:
        host, port = server.url.split("//")[1].split("/")[0].split(":")
        body = _request(renders[:1], PROMPTS[:1])
        whole = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
        for first in (b"", whole):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                if first:
                    sock.sendall(first)
                    assert b" 200 " in _read_response(sock).split(b"\r\n")[0]
                sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # and never the rest
                start = time.monotonic()
                rest = sock.recv(65536)
                # about 0.5 s measured; the bound leaves a slow or loaded machine 20 × header_timeout
                assert rest == b"" and time.monotonic() - start < 10
        assert _post(server.url, body).status_code == 200


# ------------------------------------------------------------------------------------------- the command

BRIGHTNESS_PLUGIN = """
from dgpo.rewards import register_reward

class Brightness:
    \"\"\"0.25 + brightness / 1000: dense, and recognisable in a run's metrics.\"\"\"
    name = "brightness"
    def __call__(self, images, prompts):
        return 0.25 + images.reshape(len(images), -1).mean(axis=1) / 255.0 / 1000

register_reward("brightness", Brightness, overwrite=True)
"""


@contextmanager
def served(*args):
    """``dgpo serve-reward ARGS`` as a user starts it; yields its URL once it answers, and stops it after."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgpo.cli", "serve-reward", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/score"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(url, trust_env=False, timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"dgpo serve-reward did not come up: {proc.stdout.read()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dgpo_trains_against_a_reward_served_by_dgpo_serve_reward(tiny_base, tmp_path):
    """Two DGPO epochs on the tiny base, every reward fetched over HTTP from `dgpo serve-reward` (a plug-in's
    reward): the run's rewards are the plug-in's, so the served path is the one that trained."""
    import json as _json
    from dgpo.cli import main
    plugin = tmp_path / "brightness.py"
    plugin.write_text(BRIGHTNESS_PLUGIN)
    with served("brightness", "--plugin", str(plugin)) as url:
        sets = [f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0", "rollout.prompts_per_epoch=2",
                "rollout.group_size=3", "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false",
                "eval.every=100", "optim.micro_batch=6", "model.lora_rank=2", "model.lora_alpha=2",
                "objective.timesteps_per_sample=1", "reward.name=remote", f"reward.url={url}", "reward.batch_size=2"]
        assert main(["train", "--out", str(tmp_path / "run"), *[a for k in sets for a in ("--set", k)]]) == 0
    rows = [_json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 2 and all(0.25 <= r <= 0.2511 for r in rewards)  # the served plug-in's, nothing else


def test_dgpo_serve_reward_serves_a_registered_reward(renders):
    with served("shapes_partial") as url:
        np.testing.assert_array_equal(RemoteReward(url)(renders, PROMPTS), ShapesReward("partial")(renders, PROMPTS))
    bad = subprocess.run([sys.executable, "-m", "dgpo.cli", "serve-reward", "no_such_reward"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown reward 'no_such_reward'" in bad.stderr


def test_scores_outside_the_declared_range_are_named(stub_server):
    stub_server["answer"] = (200, b'{"scores": [0.5, 7.0]}')
    images = np.zeros((2, 8, 8, 3), np.uint8)
    assert RemoteReward(stub_server["url"])(images, ["a", "b"]).tolist() == [0.5, 7.0]  # no range: any number
    with pytest.raises(UserError, match=r"answered scores\[1\] = 7, outside reward.score_range \[0, 1\] \(1 of 2\)"):
        RemoteReward(stub_server["url"], score_range=[0, 1])(images, ["a", "b"])
    with pytest.raises(UserError, match="reward.score_range must be \\[low, high\\] with low < high"):
        RemoteReward(stub_server["url"], score_range=[1, 0])
