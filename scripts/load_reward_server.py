"""The reward server under load: concurrent clients on loopback, faults injected, every score checked.

Serves a reward whose score is the identity of the image (each image carries a unique id in its first pixel,
the score is that id), so every answer can be checked exactly: ``--clients`` threads, each with its own
:class:`dgpo.rewards.client.RemoteReward`, send ``--batches`` batches of ``--batch`` images each. Every
``--fault-every``-th request is answered HTTP 503 before it reaches the reward (an overloaded server), so the
clients retry. Reports:

- lost or mis-ordered scores (a batch whose scores are not its ids in its order) — must be 0;
- images the reward scored more than once or never (the retries must not duplicate work that counts);
- latency per batch as a client sees it (retries included): p50 and p99; throughput in batches and images
  per second; the 503s answered and so the retries made.

With ``--hostile N``, N more threads attack the same server while the clients run, each in turn: a pixel bomb (a
60 KB PNG of 4096² pixels), a request over the server's pixel budget in all (9 images of 2048²), a client that
never finishes its headers and one that stalls mid-body. Every attack must be refused (413, 408, or the
connection closed) and the clients must lose nothing; their p99 is the price of the attacks.

Writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (the latency distribution) into ``--out-dir``:

    python scripts/load_reward_server.py --clients 8 --batches 200
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dgpo.cli_args import at_least
from dgpo.errors import UserError
from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json

TOOL = "load_reward_server"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=at_least(1), default=8, help="concurrent clients (default 8)")
    p.add_argument("--batches", type=at_least(1), default=200, help="batches per client (default 200)")
    p.add_argument("--batch", type=at_least(1), default=4, help="images per batch (default 4)")
    p.add_argument("--size", type=at_least(1), default=32, help="image side in pixels (default 32)")
    p.add_argument("--fault-every", type=at_least(0), default=25,
                   help="answer every N-th request with HTTP 503 before scoring it (default 25; 0 = never)")
    p.add_argument("--hostile", type=at_least(0), default=0,
                   help="threads attacking the server meanwhile: bombs, oversized requests, slow clients (default 0)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="fail if the load takes longer than this (default 300)")
    p.add_argument("--out-dir", default="runs/reward_server_load", help="output folder (default runs/reward_server_load)")
    p.add_argument("--name", default="reward_server_load")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run")
    args = p.parse_args(argv)
    if args.fault_every == 1:
        p.error("--fault-every must be 0 (no faults) or at least 2 (every request failing never succeeds)")
    return args


def image_of(identity: int, size: int) -> np.ndarray:
    """A noisy image whose first pixel spells ``identity`` in base 256 (R, G, B)."""
    rng = np.random.default_rng(identity)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[0, 0] = [(identity >> 16) & 255, (identity >> 8) & 255, identity & 255]
    return image


class IdentityReward:
    """Scores an image by the id in its first pixel, and counts how often each id was scored."""

    name = "identity"

    def __init__(self):
        self.scored: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, images, prompts):
        ids = [(int(im[0, 0, 0]) << 16) | (int(im[0, 0, 1]) << 8) | int(im[0, 0, 2]) for im in images]
        with self.lock:
            self.scored.update(ids)
        return np.asarray(ids, dtype=np.float64)


class OverloadedEvery:
    """An ASGI wrapper answering every ``every``-th POST with HTTP 503, before the app sees it."""

    def __init__(self, app, every: int):
        self.app, self.every, self.posts, self.refused = app, every, 0, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self.every:
            self.posts += 1
            if self.posts % self.every == 0:
                self.refused += 1
                body = b'{"error": "overloaded (injected)"}'
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


#: The server's limits under attack: slow clients are cut off in seconds, not the defaults' 10 s and 60 s.
HOSTILE_LIMITS = dict(header_timeout=1.0, body_timeout=2.0)


def _png_b64(side: int) -> str:
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # a few KB that would decode to side² pixels
    return base64.b64encode(buf.getvalue()).decode()


def attack(url: str, stop: threading.Event) -> Counter:
    """Hostile requests in turn until ``stop``: how each ended (``refused_413``, ``refused_408``, ``closed``,
    or ``accepted`` — which must not happen)."""
    import json
    import socket

    import httpx
    host, port = url.split("//")[1].split("/")[0].split(":")
    bomb = json.dumps({"prompts": ["x"], "images": [_png_b64(4096)]}).encode()
    big = _png_b64(2048)
    over_budget = json.dumps({"prompts": ["x"] * 9, "images": [big] * 9}).encode()
    ended: Counter = Counter()

    def post(body: bytes) -> None:
        code = httpx.post(url, content=body, timeout=30.0, trust_env=False).status_code
        ended["accepted" if code == 200 else f"refused_{code}"] += 1

    def slow(head: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head)
            reply = sock.recv(4096)
            ended["closed" if reply == b"" else f"refused_{reply.split(b' ')[1].decode()}"] += 1

    moves = [lambda: post(bomb), lambda: post(over_budget),
             lambda: slow(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
             lambda: slow(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")]
    i = 0
    while not stop.is_set():
        moves[i % len(moves)]()
        i += 1
    return ended


def run_load(clients: int, batches: int, batch: int, size: int, fault_every: int, max_seconds: float,
             hostile: int = 0) -> dict:
    """Serve, load, check; the measurements as a dict."""
    from dgpo.rewards.client import RemoteReward
    from dgpo.rewards.server import ServerLimits, serve_reward

    reward = IdentityReward()
    wrapper: dict = {}

    def wrap(app):
        wrapper["app"] = OverloadedEvery(app, fault_every)
        return wrapper["app"]

    def client(c: int) -> tuple[list[float], int]:
        remote = RemoteReward(server.url, timeout=30.0, retries=3, backoff=0.01)
        latencies, wrong = [], 0
        try:
            for b in range(batches):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the load took longer than {max_seconds:g} s")
                ids = [(c * batches + b) * batch + i for i in range(batch)]
                images = np.stack([image_of(i, size) for i in ids])
                start = time.perf_counter()
                scores = remote(images, [f"client {c} batch {b}"] * batch)
                latencies.append(time.perf_counter() - start)
                wrong += int(scores.tolist() != [float(i) for i in ids])
        finally:
            remote.close()
        return latencies, wrong

    limits = ServerLimits(**HOSTILE_LIMITS) if hostile else ServerLimits()
    attacks: Counter = Counter()
    with serve_reward(reward, wrap=wrap, limits=limits) as server:
        deadline = time.monotonic() + max_seconds
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=hostile or 1) as attackers:
            attacking = [attackers.submit(attack, server.url, stop) for _ in range(hostile)]
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                results = list(pool.map(client, range(clients)))
            wall = time.perf_counter() - start
            stop.set()
            for done in attacking:
                attacks.update(done.result())
    latencies = np.array([t for lat, _ in results for t in lat])
    expected = clients * batches * batch
    counts = Counter(reward.scored.values())
    return {
        "clients": clients, "batches_per_client": batches, "images_per_batch": batch, "image_size": size,
        "fault_every": fault_every, "hostile": hostile, "attacks": dict(attacks), "wall_s": round(wall, 3),
        "batches": int(latencies.size), "images": expected,
        "wrong_batches": sum(w for _, w in results),
        "images_scored_once": counts.get(1, 0),
        "images_scored_more_than_once": sum(n for k, n in counts.items() if k > 1),
        "images_never_scored": expected - len(reward.scored),
        "refused_503": wrapper["app"].refused,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
        "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
        "latency_max_ms": round(float(latencies.max()) * 1e3, 2),
        "batches_per_s": round(latencies.size / wall, 1),
        "images_per_s": round(expected / wall, 1),
        "latencies_ms": [round(float(t) * 1e3, 3) for t in latencies],
    }


def write_report(result: dict, out_dir: Path, name: str, overwrite: bool = False) -> list[Path]:
    """Write the report (a JSON this script wrote before is replaced with ``overwrite``; nothing else is)."""
    import platform

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    json_path, md_path, png_path = report_files(out_dir, name)
    record = {**result, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
              f"{__import__('os').cpu_count()} CPUs", "command": "python scripts/load_reward_server.py "
              f"--clients {result['clients']} --batches {result['batches_per_client']} --batch "
              f"{result['images_per_batch']} --size {result['image_size']} --fault-every {result['fault_every']}"
              + (f" --hostile {result['hostile']}" if result.get("hostile") else "")}
    write_report_json([json_path, md_path, png_path], record, TOOL, overwrite)
    rows = [("clients × batches × images", f"{result['clients']} × {result['batches_per_client']} × "
             f"{result['images_per_batch']} ({result['image_size']} px)"),
            ("wrong or mis-ordered batches", result["wrong_batches"]),
            ("images scored once / more than once / never", f"{result['images_scored_once']} / "
             f"{result['images_scored_more_than_once']} / {result['images_never_scored']}"),
            ("HTTP 503 injected (each retried)", result["refused_503"]),
            *([("hostile threads; their attacks, by how each ended", f"{result['hostile']}; " + ", ".join(
                f"{k} {v}" for k, v in sorted(result["attacks"].items())))] if result.get("hostile") else []),
            ("latency p50 / p99 / max (ms)", f"{result['latency_p50_ms']} / {result['latency_p99_ms']} / "
             f"{result['latency_max_ms']}"),
            ("throughput", f"{result['batches_per_s']} batches/s, {result['images_per_s']} images/s"),
            ("wall-clock", f"{result['wall_s']} s")]
    md = [f"`{record['command']}` ({record['machine']}, {record['date']})", "", "| measure | value |", "|---|---|",
          *[f"| {k} | {v} |" for k, v in rows]]
    md_path.write_text("\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(result["latencies_ms"], bins=60, color="tab:blue")
    for q, style in (("latency_p50_ms", "--"), ("latency_p99_ms", ":")):
        ax.axvline(result[q], color="k", linestyle=style, label=f"{q[8:11]} {result[q]} ms")
    ax.set(xlabel="batch latency as a client sees it (ms, retries included)", ylabel="batches",
           title=f"{result['clients']} clients on loopback, every {result['fault_every']}th request 503")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, md_path, png_path]


def main(argv=None) -> int:
    args = parse_args(argv)
    json_path, *companions = report_files(Path(args.out_dir), args.name)
    try:  # refused before the work, and checked again when written (the folder may change meanwhile)
        check_report_outputs(json_path, companions, TOOL, args.overwrite)
        result = run_load(args.clients, args.batches, args.batch, args.size, args.fault_every, args.max_seconds,
                          args.hostile)
        paths = write_report(result, Path(args.out_dir), args.name, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    print(paths[1].read_text())
    ok = (result["wrong_batches"] == 0 and result["images_never_scored"] == 0
          and result["images_scored_more_than_once"] == 0 and not result["attacks"].get("accepted"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
