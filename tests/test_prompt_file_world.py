"""A world read from a JSON-lines prompt file: prompts, split and categories from the file, the task metric
the header's reward averaged by category with its standard error; DGPO trains on it; a bad file is one line."""

import json

import numpy as np
import pytest

from dgpo.cli import main
from dgpo.errors import UserError
from dgpo.worlds.registry import make_world
from dgpo.worlds.categories import mean_by_category
from test_train import TINY_RUN  # also registers the test reward

LINES = [{"reward": "test_brightness"},
         {"prompt": "a photo of a red circle", "split": "train", "category": "colour", "note": "kept"},
         {"prompt": "a photo of two squares", "category": "count"},
         {"prompt": "a photo of a blue square", "split": "test", "category": "colour"},
         {"prompt": "a photo of three circles", "split": "test", "category": "count"}]


def write(path, lines) -> str:
    path.write_text("".join((json.dumps(l) if not isinstance(l, str) else l) + "\n" for l in lines))
    return str(path)


def test_prompts_split_categories_and_metadata_come_from_the_file(tmp_path):
    world = make_world(write(tmp_path / "p.jsonl", LINES))
    assert world.prompts("train") == ["a photo of a red circle", "a photo of two squares"]  # split defaults to train
    assert world.prompts("test") == ["a photo of a blue square", "a photo of three circles"]
    assert world.category("a photo of two squares") == "count" and world.metric == "mean test_brightness"
    assert world.metadata("a photo of a red circle")["note"] == "kept"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[0] = 255  # the blue square's first image is white: brightness 1
    prompts = ["a photo of a blue square"] * 2 + ["a photo of three circles"] * 2
    result = world.score(images, prompts)
    # colour: mean 0.5 over its one prompt; count: 0 → overall 0.25; SE = √((1/2)²·0.5/2)
    assert result["per_category"] == {"colour": 0.5, "count": 0.0} and result["geneval"] == 0.25
    assert result["geneval_se"] == pytest.approx(np.sqrt(0.25 * 0.5 / 2)) and "fd" not in result
    assert mean_by_category({"a": [1.0, 0.0]}, lambda p: "x")["se"] == pytest.approx(0.5)


def test_dgpo_trains_on_a_prompt_file(tiny_base, tmp_path):
    path = write(tmp_path / "p.jsonl", LINES)
    sets = [a for s in [f"model.base={tiny_base}", f"world={path}", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN]
            for a in ("--set", s)]
    assert main(["train", *sets, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["last"]["eval_per_category"]) == ["colour", "count"]  # the file's test categories
    assert summary["last"]["eval_fd"] is None and summary["gain"]["noise"] is not None
    assert "mean test_brightness" in (tmp_path / "run" / "summary.md").read_text()


@pytest.mark.parametrize("lines, message", [
    ([], "has no prompts"),
    (["not json"], r"p.jsonl:1: not JSON"),
    ([{"prompt": ""}], r'p.jsonl:1: "prompt" must be a non-empty string'),
    ([{"prompt": "x", "split": "validation"}], r'p.jsonl:1: "split" must be "train" or "test"'),
    ([{"reward": "r"}, {"prompt": "x"}, ["a list"]], r"p.jsonl:3: expected a JSON object"),
])
def test_a_bad_prompt_file_is_one_line_naming_file_and_line(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        make_world(write(tmp_path / "p.jsonl", lines))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_world(str(tmp_path / "none.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        make_world(str(tmp_path / "latin.jsonl"))
    no_reward = make_world(write(tmp_path / "q.jsonl", LINES[1:]))
    with pytest.raises(UserError, match="names no reward"):
        no_reward.score(np.zeros((1, 8, 8, 3), np.uint8), ["a photo of a red circle"])


def test_several_rewards_and_evaluation_only_rewards(tiny_base, tmp_path):
    """reward.name=a+b trains on the weighted sum (or the weighted sum of per-reward advantages) and
    eval.rewards are logged at every evaluation beside the task metric."""
    import torch
    from types import SimpleNamespace
    from dgpo.methods.batch import score_groups
    from dgpo.methods.losses import group_advantages
    from dgpo.rewards.mix import RewardMix
    from dgpo.rewards import register_reward

    class Channel:
        def __init__(self, c, scale):
            self.c, self.scale, self.name = c, scale, f"channel{c}"

        def __call__(self, images, prompts):
            return images[..., self.c].reshape(len(images), -1).mean(axis=1) / 255.0 * self.scale

    register_reward("test_red", lambda: Channel(0, 1.0), overwrite=True)
    register_reward("test_green_x100", lambda: Channel(1, 100.0), overwrite=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    prompts = ["p"] * 6
    adv = SimpleNamespace(std="group", eps=1e-4, clip=5.0)
    names = ["test_red", "test_green_x100"]
    built = [Channel(0, 1.0), Channel(1, 100.0)]
    mix_sum = RewardMix(names, built, [1.0, 0.5])
    red, green = Channel(0, 1.0)(images, prompts), Channel(1, 100.0)(images, prompts)
    np.testing.assert_allclose(mix_sum(images, prompts), red + 0.5 * green)
    mix_adv = RewardMix(names, built, [1.0, 0.5], combine="advantages")
    scored = score_groups(mix_adv, images, prompts, 3, adv, "mix")
    ids = torch.arange(2).repeat_interleave(3)
    expected = (group_advantages(torch.tensor(red).float(), ids, clip=5.0)
                + 0.5 * group_advantages(torch.tensor(green).float(), ids, clip=5.0))
    torch.testing.assert_close(scored.advantages, expected)  # each reward normalised on its own scale first
    with pytest.raises(UserError, match="one weight per reward"):
        RewardMix(names, built, [1.0])

    sets = [a for s in [f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN,
                        "reward.name=test_brightness+test_red", "reward.combine=advantages",
                        "eval.rewards=[test_red,shapes_strict]"] for a in ("--set", s)]
    assert main(["train", *sets, "--out", str(tmp_path / "run")]) == 0
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]
    assert all(sorted(r["eval_rewards"]) == ["shapes_strict", "test_red"] for r in evals)
    assert "evaluation-only reward test_red" in (tmp_path / "run" / "summary.md").read_text()


def test_the_shipped_ocr_prompt_set_loads_with_held_out_words():
    from pathlib import Path
    world = make_world(str(Path(__file__).resolve().parents[1] / "examples" / "prompts" / "ocr.jsonl"))
    train, test = world.prompts("train"), world.prompts("test")
    assert len(train) == 24 and len(test) == 12 and world.reward == "ocr"
    words = lambda prompts: {world.metadata(p)["text"] for p in prompts}  # noqa: E731
    assert not words(train) & words(test)  # a test word is never trained on
    from dgpo.rewards.ocr import target_text
    assert all(target_text(p) == world.metadata(p)["text"] for p in train + test)


TARGET_PLUGIN = """
from dgpo.rewards import register_reward

class Target:
    \"\"\"The prompt file's "target" for each image (+ brightness / 1000): a reward that needs the prompt's metadata,
    as GenEval needs its tag and object list.\"\"\"
    name = "target"
    def __call__(self, images, prompts, metadata):
        return [m["target"] + im.mean() / 255 / 1000 for im, m in zip(images, metadata)]

register_reward("target", Target, overwrite=True)
"""


def test_metadata_reaches_a_reward_served_by_dgpo_serve_reward(tiny_base, tmp_path):
    """Every train prompt's line says target 0.25, every test prompt's 0.75; the file names no reward, the run
    trains and evaluates with `reward.name=remote`: the logged rewards are the targets, so the metadata travelled
    from the file through the trainer and the client to the served reward, and the evaluation used it too."""
    from test_reward_serving import served
    lines = [{**line, "target": 0.25 if line.get("split", "train") == "train" else 0.75} for line in LINES[1:]]
    path = write(tmp_path / "p.jsonl", lines)
    plugin = tmp_path / "target.py"
    plugin.write_text(TARGET_PLUGIN)
    with served("target", "--plugin", str(plugin)) as url:
        sets = [a for s in [f"model.base={tiny_base}", f"world={path}", "run.epochs=2", "run.time_budget_min=0",
                            *TINY_RUN, "reward.name=remote", f"reward.url={url}", "reward.batch_size=2"]
                for a in ("--set", s)]
        assert main(["train", *sets, "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.25 <= r["reward"] <= 0.2511 for r in rows if "reward" in r)
    evals = [r["eval_geneval"] for r in rows if "eval_geneval" in r]
    assert len(evals) == 2 and all(0.75 <= e <= 0.7511 for e in evals)
    assert "mean remote" in (tmp_path / "run" / "summary.md").read_text()
