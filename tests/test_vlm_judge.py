"""The VLM-judge reward against a small local server that speaks the OpenAI chat-completions API: the request
format (vision message, model, key), scores parsed and rescaled in the batch's order, retries, and one clear
line for every way a judge can fail."""

import base64
import io
import json
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from PIL import Image

from dgpo.errors import UserError
from dgpo.rewards.vlm_judge import VLMJudge, parse_score
from conftest import http_stub


@pytest.fixture
def judge_server():
    """Answers like a judge: 'Score: N' with N = 1 + 9 · (the image's mean brightness) — unless
    ``state["answers"]`` holds canned (status, body) answers to give first. Records every request."""
    state = {"answers": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if state["answers"]:
                status, answer = state["answers"].pop(0)
            else:
                image_part, text_part = body["messages"][0]["content"]
                data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
                brightness = np.asarray(Image.open(io.BytesIO(data))).mean() / 255
                reply = f"The caption was {text_part['text'][:40]!r}. Looks fine.\nScore: {1 + 9 * brightness:.3f}"
                status, answer = 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
            payload = answer.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with http_stub(Handler) as port:
        state["url"] = f"http://127.0.0.1:{port}/v1"
        yield state


def grey(levels):
    return np.stack([np.full((16, 16, 3), v, np.uint8) for v in levels])


def test_scores_come_back_parsed_rescaled_and_in_order(judge_server, monkeypatch):
    monkeypatch.setenv("DGPO_JUDGE_API_KEY", "sk-local")
    judge = VLMJudge(judge_server["url"], "unified-reward", concurrency=4)
    levels = [0, 255, 51, 204, 102, 153]
    scores = judge(grey(levels), [f"prompt {i}" for i in range(6)])
    np.testing.assert_allclose(scores, np.array(levels) / 255, atol=2e-3)  # (1 + 9b − 1) / 9 = b, in order
    first = judge_server["requests"][0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-local"
    assert first["body"]["model"] == "unified-reward" and first["body"]["temperature"] == 0.0
    texts = sorted(r["body"]["messages"][0]["content"][1]["text"] for r in judge_server["requests"])
    assert all(f'"prompt {i}"' in t and "from 1 (not at all) to 10" in t for i, t in enumerate(texts))


def test_an_overloaded_judge_is_retried(judge_server):
    judge_server["answers"] = [(503, "{}"), (429, "{}")]
    got = VLMJudge(judge_server["url"], "m", retries=2, backoff=0.0)(grey([255]), ["x"])
    assert got.tolist() == [1.0] and len(judge_server["requests"]) == 3


@pytest.mark.parametrize("answer, message", [
    ((200, json.dumps({"choices": [{"message": {"content": "A lovely picture."}}]})), "gave no 'Score: N'"),
    ((200, json.dumps({"choices": [{"message": {"content": "Score: 42"}}]})), "scored 42, off the scale 1–10"),
    ((200, "<html>proxy error</html>"), "not a chat completion"),
    ((401, json.dumps({"error": "bad key"})), "refused the request .*DGPO_JUDGE_API_KEY"),
    ((500, "CUDA out of memory"), "HTTP 500: 'CUDA out of memory'"),
])
def test_a_judge_that_fails_is_one_clear_line(judge_server, answer, message):
    judge_server["answers"] = [answer]
    with pytest.raises(UserError, match=message) as info:
        VLMJudge(judge_server["url"], "m", retries=0)(grey([10]), ["x"])
    assert judge_server["url"] in str(info.value) and "\n" not in str(info.value)


def test_a_judge_that_is_down_is_named_after_its_retries():
    with pytest.raises(UserError, match="not reachable.*reward.url.*after 2 attempts"):
        VLMJudge("http://127.0.0.1:9/v1", "m", retries=1, backoff=0.0)(grey([10]), ["x"])


def test_scores_are_parsed_as_judges_write_them():
    assert parse_score("reasoning...\nFinal Score: 4.5") == 4.5
    assert parse_score("Score: **7**") == 7.0 and parse_score("score = 8/10") == 8.0
    assert parse_score("I would give it 9.") is None


def test_settings_are_checked_before_any_request():
    with pytest.raises(UserError, match="API base"):
        VLMJudge("localhost:8000", "m")
    with pytest.raises(UserError, match="reward.model=NAME"):
        VLMJudge("http://127.0.0.1:8000/v1", "")
    from types import SimpleNamespace

    from dgpo.rewards import reward_of_run
    cfg = SimpleNamespace(name="vlm_judge", model="qwen-vl", url="http://127.0.0.1:8000/v1", timeout=5.0, retries=1,
                          batch_size=0, score_range=[])
    name, judge = reward_of_run(cfg, world=None)
    assert isinstance(judge, VLMJudge) and judge.model == "qwen-vl" and judge.timeout == 5.0
