"""Rewards: the shapes scorer, the HTTP protocol end to end, and clear errors for every failure mode."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from dgpo.errors import UserError
from dgpo.rewards import (RemoteReward, Reward, ShapesReward, available_rewards, make_reward,
                          register_reward, serve_reward)
from dgpo.worlds import shapes

PROMPTS = [
    "a photo of a circle",
    "a photo of three squares",
    "a photo of a red triangle",
    "a photo of a square left of a circle",
    "a photo of a blue circle and a yellow triangle",
]


@pytest.fixture(scope="module")
def renders():
    return np.stack([shapes.render(p, 32, seed) for seed, p in enumerate(PROMPTS)])


def test_shapes_reward_renders_and_blanks(renders):
    blank = np.zeros_like(renders)
    for kind in ("partial", "strict", "mixed"):
        reward = ShapesReward(kind)
        assert isinstance(reward, Reward) and reward.name == f"shapes_{kind}"
        ok = reward(renders, PROMPTS)
        assert ok.dtype == np.float64 and ok.shape == (len(PROMPTS),)
        np.testing.assert_array_equal(ok, 1.0)
        np.testing.assert_array_equal(reward(blank, PROMPTS), 0.0)


def test_shapes_strict_vs_partial():
    # A render of "a circle and a square" only half-satisfies "a circle and a triangle".
    image = shapes.render("a photo of a circle and a square", 32, 0)[None]
    prompt = ["a photo of a circle and a triangle"]
    assert ShapesReward("partial")(image, prompt).tolist() == [0.5]
    assert ShapesReward("strict")(image, prompt).tolist() == [0.0]
    assert ShapesReward("mixed")(image, prompt).tolist() == [0.25]


def test_shapes_reward_input_errors(renders):
    reward = ShapesReward()
    with pytest.raises(ValueError, match="'a photo of a dragon' is not in the shapes grammar"):
        reward(renders[:2], ["a photo of a circle", "a photo of a dragon"])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(renders[:2], PROMPTS[:3])
    with pytest.raises(ValueError, match="uint8"):
        reward(renders.astype(np.float32), PROMPTS)
    with pytest.raises(UserError, match="kind"):
        ShapesReward("fuzzy")


@pytest.fixture
def shapes_server():
    server, url = serve_reward(ShapesReward("partial"))
    yield url
    server.shutdown()
    server.server_close()


def test_remote_matches_in_process(shapes_server, renders):
    images = renders.copy()
    images[1] = 0  # one failure so the scores are not all equal
    remote = RemoteReward(shapes_server, timeout=2.0)
    got = remote(images, PROMPTS)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, ShapesReward("partial")(images, PROMPTS))
    assert got.tolist()[1] == 0.0
    # The server's 400 (prompt outside the grammar) comes back quoted in a UserError.
    with pytest.raises(UserError, match="HTTP 400.*a photo of a dragon"):
        remote(images[:1], ["a photo of a dragon"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_not_reachable():
    url = f"http://127.0.0.1:{_free_port()}/score"
    start = time.monotonic()
    with pytest.raises(UserError, match="not reachable") as info:
        RemoteReward(url, timeout=1.0, retries=2, backoff=0.05)(np.zeros((1, 8, 8, 3), np.uint8), ["x"])
    assert url in str(info.value) and "reward.url" in str(info.value)
    assert time.monotonic() - start < 2.0


GARBAGE = {
    "not_json": (200, b"<html>hello</html>", "not JSON"),
    "no_scores": (200, b'{"result": [1.0]}', '"scores"'),
    "wrong_length": (200, b'{"scores": [1.0, 0.0, 1.0]}', "3 scores for 2 images"),
    "nan": (200, b'{"scores": [NaN, 1.0]}', "not finite"),
    "not_numbers": (200, b'{"scores": ["high", 1.0]}', "is not a number"),
    "http_500": (500, b"Traceback: CUDA out of memory" + b"x" * 500, "HTTP 500.*CUDA out of memory"),
}


@pytest.fixture
def stub_server():
    """A server that answers whatever ``state["answer"]`` = (status, body) says, optionally after a delay."""
    state = {"answer": (200, b"{}"), "delay": 0.0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(state["delay"])
            status, body = state["answer"]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/"
    yield state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("case", list(GARBAGE))
def test_remote_garbage_answers(stub_server, case):
    status, body, pattern = GARBAGE[case]
    stub_server["answer"] = (status, body)
    reward = RemoteReward(stub_server["url"], timeout=2.0)
    with pytest.raises(UserError, match=pattern) as info:
        reward(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
    message = str(info.value)
    assert stub_server["url"] in message
    if status == 200:
        assert "answered garbage" in message
    else:
        assert len(message) < 400  # the body is quoted, but only its first 200 characters


def test_remote_timeout(stub_server):
    stub_server["answer"] = (200, b'{"scores": [1.0]}')
    stub_server["delay"] = 1.0
    start = time.monotonic()
    with pytest.raises(UserError, match=r"did not answer within 0.3 s.*reward.timeout"):
        RemoteReward(stub_server["url"], timeout=0.3, retries=2)(np.zeros((1, 8, 8, 3), np.uint8), ["a"])
    assert time.monotonic() - start < 0.9  # timeouts are not retried


def test_remote_bad_url():
    with pytest.raises(UserError, match="not an http"):
        RemoteReward("localhost:8000")


def test_serve_reward_loopback_only():
    with pytest.raises(UserError, match="loopback"):
        serve_reward(ShapesReward(), host="0.0.0.0")


def test_serve_reward_rejects_bad_requests(shapes_server):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for body in (b"not json", json.dumps({"prompts": ["a photo of a circle"], "images": ["!!notbase64"]}).encode()):
        req = urllib.request.Request(shapes_server, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(req, timeout=2.0)
        assert info.value.code == 400
        assert "bad request" in json.loads(info.value.read())["error"]


def test_registry():
    assert {"shapes_partial", "shapes_strict", "shapes_mixed", "shapes_soft", "remote"} <= set(available_rewards())
    assert make_reward("shapes_strict").name == "shapes_strict"
    # the soft reward is the world's soft partial score: a rounded square earns part of "a photo of a square"
    yy, xx = np.mgrid[0:12, 0:12]
    corner_l1 = np.minimum(np.minimum(yy, 11 - yy) + np.minimum(xx, 11 - xx), 99)
    im = np.zeros((1, 32, 32, 3), np.uint8)
    im[0, 4:16, 4:16][corner_l1 >= 3] = shapes.COLORS["red"]   # corners cut by 6 px each: fill 120/144
    soft = make_reward("shapes_soft")(im, ["a photo of a square"])
    assert soft[0] == pytest.approx(shapes.soft_partial_score(im[0], "a photo of a square"))
    assert 0.0 < soft[0] < 0.5 and make_reward("shapes_partial")(im, ["a photo of a square"])[0] == 0.0
    assert make_reward("remote", url="http://127.0.0.1:1/", timeout=1.0).timeout == 1.0
    with pytest.raises(UserError, match="unknown reward 'clip_score'.*shapes_partial.*shapes_strict"):
        make_reward("clip_score")
    with pytest.raises(UserError, match="needs url"):
        make_reward("remote")
    with pytest.raises(UserError, match="bad options"):
        make_reward("shapes_partial", temperature=2)

    class Constant:
        name = "constant"

        def __call__(self, images, prompts):
            return np.ones(len(prompts))

    register_reward("test_constant", Constant, overwrite=True)
    assert make_reward("test_constant")(np.zeros((3, 4, 4, 3), np.uint8), ["a"] * 3).tolist() == [1.0] * 3
    with pytest.raises(UserError, match="already registered"):
        register_reward("test_constant", Constant)
