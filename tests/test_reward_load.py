"""The reward server under concurrent clients with injected 503s: nothing lost, mis-ordered or scored twice."""

import itertools

import pytest

from conftest import load_script


def check(result: dict, clients: int, batches: int, batch: int) -> None:
    assert result["batches"] == clients * batches and result["images"] == clients * batches * batch
    assert result["wrong_batches"] == 0  # every batch's scores are its own ids, in its order
    assert result["images_scored_once"] == clients * batches * batch
    assert result["images_scored_more_than_once"] == 0 and result["images_never_scored"] == 0
    assert result["refused_503"] >= clients * batches // 25 - 1  # the retries really happened
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"] <= result["latency_max_ms"]


def test_concurrent_clients_through_injected_overloads(tmp_path):
    load = load_script("scripts/load_reward_server.py")
    result = load.run_load(clients=8, batches=40, batch=4, size=16, fault_every=25, max_seconds=120)
    check(result, 8, 40, 4)
    paths = load.write_report(result, tmp_path, "load")
    assert [p.name for p in paths] == ["load.json", "load.md", "load.png"] and all(p.stat().st_size for p in paths)


def test_clients_lose_nothing_while_the_server_is_attacked():
    """Two hostile threads — pixel bombs, requests over the pixel budget, clients that never finish their headers
    or stall mid-body — beside four clients: every attack refused or cut off, every score right, none twice."""
    load = load_script("scripts/load_reward_server.py")
    result = load.run_load(clients=4, batches=20, batch=4, size=16, fault_every=25, max_seconds=120, hostile=2)
    check(result, 4, 20, 4)
    attacks = result["attacks"]
    assert "accepted" not in attacks and attacks.get("refused_413", 0) >= 2, attacks
    assert sum(attacks.values()) >= 4


def test_the_load_check_sees_a_mis_ordered_answer(monkeypatch):
    """The check can fail: a client whose answers come back reversed once is counted."""
    load = load_script("scripts/load_reward_server.py")
    from dgpo.rewards import client as reward_client
    real, calls = reward_client.RemoteReward.__call__, itertools.count(1)

    def once_reversed(self, images, prompts):
        k = next(calls)  # the call's number, taken before the request: the clients' threads overlap
        scores = real(self, images, prompts)
        return scores[::-1] if k == 3 else scores

    monkeypatch.setattr(reward_client.RemoteReward, "__call__", once_reversed)
    result = load.run_load(clients=2, batches=5, batch=4, size=16, fault_every=0, max_seconds=60)
    assert result["wrong_batches"] == 1 and result["refused_503"] == 0


@pytest.mark.slow
def test_eight_clients_by_two_hundred_batches(tmp_path):
    load = load_script("scripts/load_reward_server.py")
    assert load.main(["--clients", "8", "--batches", "200", "--out-dir", str(tmp_path), "--name", "load"]) == 0
    import json
    check(json.loads((tmp_path / "load.json").read_text()), 8, 200, 4)
