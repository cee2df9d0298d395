"""A training job through random kills and resumes: does it end exactly where the uninterrupted run ends?

Runs a training command (``dgpo train``, ``tdm-r1 distill`` or ``tdm-r1 train``, as its module and arguments)
twice: once straight through into ``OUT/straight``, and once into ``OUT/killed`` while this script kills the
whole process tree with SIGKILL at ``--kills`` seeded random moments — mid-rollout, mid-update or
mid-checkpoint-write, wherever the moment falls — and continues it each time with ``--resume`` (or starts it
again with ``--overwrite`` when it died before its first checkpoint). With ``--reward-server NAME`` both runs
score through ``dgpo serve-reward NAME``, and the killed run's server is itself killed and restarted at random
moments (the client retries; a run that gives up is resumed like a killed one). Then it compares the two runs:
every tensor of ``final/`` and every row of ``metrics.jsonl`` (timing columns aside) must be equal, bit for bit
on a CPU. Writes ``OUT/chaos.json`` and prints how many kills the run survived.

    python scripts/chaos.py --kills 10 --out OUT -- dgpo.cli train --set run.epochs=40 --set run.time_budget_min=0 \
        --set eval.every_minutes=0 --set eval.every=10 --set run.threads=1
    python scripts/chaos.py --kills 5 --processes 2 --out OUT -- dgpo.cli train --set run.epochs=10
    python scripts/chaos.py --kills 5 --reward-server shapes_partial --out OUT -- dgpo.cli train --set run.epochs=20

``--signal SIGTERM`` plays a scheduler's preemption instead: each moment sends SIGTERM to every process of the
job, which should checkpoint at its next safe point and exit with status 75 (:mod:`dgpo.runtime.preemption`)
within ``--grace`` seconds (else it is SIGKILLed, and counted); every launch, the first included, is the same
requeue-safe command, ``--resume-or-start RUN``. ``chaos.json`` then also records each launch's exit status and
how long each stop took, and whether the launch left the run folder as it found it (a SIGTERM that lands
while Python starts, before the command handles it, ends the launch with -15 and must change nothing).

    python scripts/chaos.py --signal SIGTERM --kills 10 --out OUT -- dgpo.cli train --set run.epochs=40 \
        --set run.time_budget_min=0 --set eval.every_minutes=0 --set eval.every=10 --set run.threads=1

Give the run ``run.time_budget_min=0`` and ``eval.every_minutes=0`` (the default recipes stop and evaluate on
wall-clock, which no two runs share) and one thread per process (``run.threads=1``): the equality is what is
checked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5, help="signals sent to the training job (default 5)")
    p.add_argument("--signal", choices=("SIGKILL", "SIGTERM"), default="SIGKILL",
                   help="SIGKILL (a crash; resumed with --resume) or SIGTERM (a preemption; every launch "
                        "--resume-or-start RUN); default SIGKILL")
    p.add_argument("--moments", metavar="LOW,HIGH",
                   help="each signal lands at a uniform fraction of the uninterrupted run's length after its launch "
                        "(default 0.05,0.3 for SIGKILL; 0.3,0.6 for SIGTERM, past Python's start-up on a short run)")
    p.add_argument("--grace", type=float, default=60, help="with SIGTERM: seconds the job may take to stop before "
                                                           "it is SIGKILLed (default 60)")
    p.add_argument("--server-kills", type=int, default=2, help="with --reward-server: kills of the server (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--processes", type=int, default=1, help="training processes (accelerate launch; default 1)")
    p.add_argument("--reward-server", metavar="NAME", help="score through `dgpo serve-reward NAME` on loopback")
    p.add_argument("--timeout", type=float, default=1800, help="seconds any one launch may take (default 1800)")
    p.add_argument("--out", required=True, help="a new folder: straight/, killed/, chaos.json")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE ARGS…, e.g. -- dgpo.cli train --set k=v")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if len(args.command) < 2:
        p.error("give the training command after --, e.g. -- dgpo.cli train --set run.epochs=20")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module_args: list[str], processes: int, log_path: Path) -> subprocess.Popen:
    """The command in a new process group (so a kill takes every process of it), output appended to a log."""
    if processes == 1:
        cmd = [sys.executable, "-m", *module_args]
    else:  # without GPUs, --multi_gpu launches CPU processes over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", *module_args]
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): the workers a launcher starts in sessions of their own, which a
    kill of its process group would not reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` to the launched process, its group and every process below it."""
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> bool:
    """SIGKILL the launched process, its group and every process below it; True if it was still running."""
    if proc.poll() is not None:
        return False
    signal_tree(proc, signal.SIGKILL)
    proc.wait()
    return True


def terminate_tree(proc: subprocess.Popen, grace: float) -> dict | None:
    """A preemption: SIGTERM to every process of the job, then up to ``grace`` seconds for it to stop (SIGKILL
    after that). None if it had already ended; else its exit status, the seconds it took and whether it had to
    be killed."""
    if proc.poll() is not None:
        return None
    t0 = time.time()
    signal_tree(proc, signal.SIGTERM)
    try:
        status = proc.wait(timeout=grace)
        killed = False
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        status, killed = proc.returncode, True
    return {"status": status, "seconds": round(time.time() - t0, 2), "killed_after_grace": killed}


class RewardServer:
    """``dgpo serve-reward NAME`` on a loopback port, restartable on the same port."""

    def __init__(self, name: str, log_path: Path):
        self.name, self.port, self.log_path, self.proc = name, free_port(), log_path, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    def start(self) -> None:
        self.proc = launch(["dgpo.cli", "serve-reward", self.name, "--port", str(self.port)], 1, self.log_path)
        import httpx
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                httpx.get(self.url, timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit(f"the reward server did not come up; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)


def run_folder_command(command: list[str], run_dir: Path, how: str, server: RewardServer | None) -> list[str]:
    """``command`` aimed at ``run_dir``: a fresh start (``--out``), a start over (``--overwrite``), ``--resume``, or
    the requeue-safe ``--resume-or-start`` (how = "requeue")."""
    reward = ["--set", "reward.name=remote", "--set", f"reward.url={server.url}"] if server else []
    if how == "resume":
        return [*command[:2], "--resume", str(run_dir)]
    if how == "requeue":
        return [*command, *reward, "--resume-or-start", str(run_dir)]
    return [*command, *reward, "--out", str(run_dir), *(["--overwrite"] if how == "overwrite" else [])]


def folder_state(run_dir: Path) -> dict:
    """Every file of the run folder with its size and modification time: what a launch changed, if anything."""
    if not run_dir.is_dir():
        return {}
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def finished(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir()


def has_checkpoint(run_dir: Path) -> bool:
    from dgpo.runtime.checkpoint import list_checkpoints  # what --resume itself will look for
    return bool(list_checkpoints(run_dir))


def straight_run(args, run_dir: Path, server: RewardServer | None) -> float:
    t0 = time.time()
    proc = launch(run_folder_command(args.command, run_dir, "new", server), args.processes, run_dir.parent / "straight.log")
    if proc.wait(timeout=args.timeout) != 0:
        raise SystemExit(f"the uninterrupted run failed; see {run_dir.parent / 'straight.log'}")
    return time.time() - t0


def killed_run(args, run_dir: Path, server: RewardServer | None, seconds: float) -> dict:
    """Kill the job ``--kills`` times at random moments of a straight run's length, resuming it each time;
    with a server, kill and restart it too. Returns what happened."""
    rng = random.Random(args.seed)
    log = run_dir.parent / "killed.log"
    kills = landed = restarts = server_kills = 0
    stops: list[dict] = []  # with SIGTERM: each stop's exit status and seconds
    how = "requeue" if args.signal == "SIGTERM" else "new"
    server_moments = sorted(rng.uniform(0.1, 1.0) * seconds for _ in range(args.server_kills if server else 0))
    while not finished(run_dir):
        before = folder_state(run_dir)
        proc = launch(run_folder_command(args.command, run_dir, how, server), args.processes, log)
        t0 = time.time()
        # early in a straight run's length: a resumed launch (and one whose first evaluation is now cached) has
        # less left to run than the straight run had, and every launch should be hit until --kills have landed
        # (a SIGTERM, later: in the run loop, where a preemption is checkpointed, rather than while Python starts)
        early, late = (float(x) for x in args.moments.split(",")) if args.moments else (
            (0.3, 0.6) if args.signal == "SIGTERM" else (0.05, 0.3))
        moment = rng.uniform(early, late) * seconds if kills < args.kills else None
        while proc.poll() is None:
            now = time.time() - t0
            if moment is not None and now >= moment:
                kills += 1
                if args.signal == "SIGTERM":
                    stop = terminate_tree(proc, args.grace)
                    if stop is not None:
                        landed += 1
                        stops.append({**stop, "folder_unchanged": folder_state(run_dir) == before})
                else:
                    landed += kill_tree(proc)
                break
            if server_moments and now >= server_moments[0]:
                server_moments.pop(0)
                server.stop()
                server_kills += 1
                time.sleep(rng.uniform(0.5, 3.0))  # down for a while: the client's retries cover it
                server.start()
            if now > args.timeout:
                kill_tree(proc)
                raise SystemExit(f"a launch ran past --timeout {args.timeout:g} s; see {log}")
            time.sleep(0.05)
        ended_alone = moment is None or time.time() - t0 < moment  # not stopped by this script
        if ended_alone and proc.returncode != 0 and not finished(run_dir):
            restarts += 1  # it gave up (e.g. the reward server down too long): resumed like a killed one
            if restarts > 20:
                raise SystemExit(f"the run keeps failing without being killed; see {log}")
        if args.signal == "SIGKILL":
            how = "resume" if has_checkpoint(run_dir) else "overwrite"
    return {"signal": args.signal, "kills": kills, "kills_that_landed": landed, "server_kills": server_kills,
            "failed_and_resumed": restarts, **({"stops": stops} if args.signal == "SIGTERM" else {})}


def is_timing(key: str) -> bool:
    """A column of metrics.jsonl that measures the machine, not the run: wall-clock (train_seconds, rollout_s,
    …) and peak memory. No two runs share those."""
    return "seconds" in key or key.endswith("_s") or key == "peak_memory_gb"


def comparable_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


def compare(a: Path, b: Path) -> dict:
    """Every tensor under final/ and every metrics row (timing aside) of runs ``a`` and ``b``."""
    import torch
    from safetensors.torch import load_file
    files = sorted(p.relative_to(a / "final") for p in (a / "final").rglob("*.safetensors"))
    differing = []
    for rel in files:
        x, y = load_file(str(a / "final" / rel)), load_file(str(b / "final" / rel)) if (b / "final" / rel).is_file() else {}
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            differing.append(str(rel))
    rows_a, rows_b = comparable_rows(a), comparable_rows(b)
    first_row_diff = next((i for i, (r, s) in enumerate(zip(rows_a, rows_b)) if r != s), None)
    same_rows = len(rows_a) == len(rows_b) and first_row_diff is None
    return {"tensor_files": [str(f) for f in files], "differing_tensor_files": differing,
            "metrics_rows": len(rows_a), "metrics_equal": same_rows, "first_differing_row": first_row_diff,
            "equal": bool(files) and not differing and same_rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {str(out)!r} is not empty: give a new folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    server = RewardServer(args.reward_server, out / "server.log") if args.reward_server else None
    try:
        if server:
            server.start()
        seconds = straight_run(args, out / "straight", server)
        print(f"uninterrupted run: {seconds:.1f} s")
        happened = killed_run(args, out / "killed", server, seconds)
    finally:
        if server:
            server.stop()
    result = {"command": args.command, "processes": args.processes, "seed": args.seed,
              "reward_server": args.reward_server, "straight_seconds": round(seconds, 1), **happened,
              **compare(out / "straight", out / "killed")}
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    verdict = "the same final weights and metrics" if result["equal"] else "a DIFFERENT result"
    print(f"{happened['kills_that_landed']} kills landed ({happened['kills']} tried), {happened['server_kills']} reward-"
          f"server kills, {happened['failed_and_resumed']} failed launches resumed: {verdict} as the uninterrupted run "
          f"({out / 'chaos.json'})")
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
