"""A chaos run: a real asynchronous `estuary train` while a seeded loop `kill -9`s its parts.

    .venv/bin/python -m bench.chaos [--minutes 10] [--seed 0] [--min-gap 30] [--max-gap 90]
                                    [--max-faults N] [--out DIR] [key=value ...]

The run is `configs/tiny_cpu.yaml` made cheap (no SFT, no MTP drafts, a 4-instance evaluation at
the start and the end only, a checkpoint every 5 steps) and durable (`services.redis.durable=true`:
the embedded Redis keeps an append-only file and is restarted if it dies), for `--minutes`
(`run.time_budget_s`; with `--max-faults N`, two steps after the N-th fault). From its first
step on, a chaos thread waits a seeded 30-90 s (`--min-gap`, `--max-gap`), then `kill -9`s one of:
- a rollout worker: Ray restarts the actor; the groups it was generating were never published;
- the learner: Ray restarts it from its last checkpoint, and it re-trains the uncommitted steps
  from the entries the stream hands back;
- the Redis server: restarted on the same port, its append-only file replayed, while producers
  and the learner retry with backoff.
The kinds come in seeded, shuffled rounds of three, so each is hit about equally often. PIDs come
from the parts' own records: Ray's actor table (GCS) for the actors `<run>:learner` and
`<run>:rollout-<i>` (it answers while the actor is busy in a long call), Redis's `INFO server`
process_id.

What it counts comes from the run's own records once it has ended, never from the chaos loop:
- produced: the stream's `<key>:published` (every group id the server ever appended);
- trained: the groups the learner's commit records name (`checkpoints/commits/`);
- dropped: groups the learner settled untrained, by reason (`<key>:dropped`), and dead letters;
- left: groups still in the stream (XRANGE), `pending` of them read but not yet trained;
- lost: produced and none of the above; twice: a group in two commits (or twice in one, or
  both trained and dropped);
- steps redone: steps the learner reported again after a restart (the driver's step reports);
- final step: the newest checkpoint's.

Prints the faults and a table, then `RESULT` lines. A count's baseline is its target (0 lost, 0
twice, 10 faults): for lost and twice the ratio is baseline/ours with 0/0 read as 1.00 (target
met, below 1 missed); for faults it is ours/baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("rollout", "learner", "redis")
CHEAP = ["sft.steps=0", "model.mtp_steps=0", "eval.every_steps=0", "eval.instances=4",
         "eval.samples_per_instance=1", "eval.pass_k=1", "eval.budgets=[]", "services.redis.durable=true",
         "run.max_steps=1000000", "learner.checkpoint_every=5"]


@dataclass
class Fault:
    seconds: float  # since `run_chaos` started the run
    kind: str
    target: str
    pid: int


class ChaosLoop(threading.Thread):
    """Kills a seeded random part of the run every `min_gap`-`max_gap` s until `deadline`
    (monotonic) or `max_faults`; started by the first step, when the Redis address is known."""

    def __init__(self, run_name: str, workers: int, seed: int, min_gap: float, max_gap: float,
                 started: float, deadline: float, max_faults: int | None = None) -> None:
        super().__init__(daemon=True, name="chaos")
        self.run_name, self.workers = run_name, workers
        self.rng = random.Random(seed)
        self.min_gap, self.max_gap, self.max_faults = min_gap, max_gap, max_faults
        self.started, self.deadline = started, deadline
        self.redis_url, self.redis_server = "", None  # known from the first step on
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()
        self.done = threading.Event()  # every one of `max_faults` injected

    def run(self) -> None:
        round_: list[str] = []
        while self.max_faults is None or len(self.faults) < self.max_faults:
            gap = self.rng.uniform(self.min_gap, self.max_gap)
            if time.monotonic() + gap > self.deadline or self.stopped.wait(gap):
                return
            if not round_:
                round_ = list(KINDS)
                self.rng.shuffle(round_)
            kind = round_.pop()
            try:
                target, pid = self._find(kind)
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
            except Exception as e:  # a part mid-restart: say so, try again after the next gap
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            self.faults.append(Fault(time.monotonic() - self.started, kind, target, pid))
            print(f"chaos: kill -9 {target} (pid {pid}) at {self.faults[-1].seconds:.0f} s", flush=True)
        self.done.set()

    def _find(self, kind: str) -> tuple[str, int]:
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
            try:
                return "redis-server", int(client.info("server")["process_id"])
            finally:
                client.close()
        index = self.rng.randrange(self.workers)
        name = f"{self.run_name}:learner" if kind == "learner" else f"{self.run_name}:rollout-{index}"
        return name, _actor_pid(name)


def _actor_pid(name: str, timeout_s: float = 300.0) -> int:
    """The process of a named actor once it is alive (a restarting one is waited for)."""
    import ray
    from ray._private.state import actors  # the GCS actor table; ray.util.state needs the dashboard

    actor_id = ray.get_actor(name, namespace="estuary")._actor_id.hex()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = actors(actor_id=actor_id)
        if info.get("State") == "ALIVE" and info.get("Pid"):
            return int(info["Pid"])
        time.sleep(0.5)
    raise TimeoutError(f"{name} not alive after {timeout_s:.0f} s")


def _wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # a killed child of ours stays a zombie until reaped: dead all the same
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"pid {pid} still alive {timeout_s:.0f} s after SIGKILL")


@dataclass
class Tally:
    """What the run's own records say happened to every group."""

    produced: int
    trained: int
    dropped: dict[str, int]
    dead: int
    left: int
    pending: int
    lost: list[str]
    twice: list[str]
    unknown: list[str]  # trained or dropped, yet never published: the records disagree
    commits: int
    final_step: int
    trained_ids: set[str] = field(default_factory=set)
    steps_redone: int = 0
    driver_agrees: bool = True
    faults: list[Fault] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    redis_restarts: int = 0


def tally(run_dir: Path, key: str) -> Tally:
    """Count from the learner's commit records and the stream as its append-only file left it."""
    from learner.checkpoint import commit_records, latest_checkpoint
    from streams.redis_server import EmbeddedRedis
    from streams.redis_stream import TrajectoryStream

    records = commit_records(run_dir)
    uses = Counter(g for record in records for g in record.get("groups", []))
    with EmbeddedRedis(data_dir=run_dir / "redis", durable=True) as server:
        stream = TrajectoryStream(server.url, key=key, consumer="chaos-audit")
        client = stream.client
        produced = {m.decode() for m in client.smembers(stream.published_key)}
        dropped = stream.dropped()
        dead = {d.get("group", "") for d in stream.dead_letters()}
        left = {fields[b"id"].decode() for _, fields in client.xrange(key)}
        pending = client.xpending(key, stream.group)["pending"]
        stream.close()
    settled = set(uses) | set(dropped) | dead | left
    latest = latest_checkpoint(run_dir)
    final = json.loads((latest / "meta.json").read_text())["step"] if latest else 0
    return Tally(produced=len(produced), trained=len(uses), dropped=dict(Counter(dropped.values())),
                 dead=len(dead), left=len(left), pending=pending, lost=sorted(produced - settled),
                 twice=sorted(g for g, n in uses.items() if n > 1) + sorted(set(uses) & set(dropped)),
                 unknown=sorted(settled - produced - {""}), commits=len(records), final_step=final,
                 trained_ids=set(uses))


def run_chaos(minutes: float = 10, seed: int = 0, min_gap: float = 30, max_gap: float = 90,
              overrides: list[str] | None = None, out_dir: str | Path | None = None,
              max_faults: int | None = None, config: str = "tiny_cpu") -> Tally:
    """One chaos run (in this process, from its main thread: the embedded Redis dies with the
    thread that started it); returns the tally with the faults injected."""
    from configs import load_config
    from estuary.train import train

    with tempfile.TemporaryDirectory(prefix="estuary-chaos-") as tmp:
        out = Path(out_dir or tmp)
        cfg = load_config(config, [*CHEAP, f"run.time_budget_s={minutes * 60:.0f}", "run.name=chaos",
                                   f"run.output_dir={out}", *(overrides or [])])
        if cfg.learner.checkpoint_every <= 0:
            raise SystemExit("the chaos run counts trained groups from checkpoints: learner.checkpoint_every > 0")
        started = time.monotonic()
        chaos = ChaosLoop(cfg.run.name, cfg.rollout.num_workers, seed, min_gap, max_gap, started,
                          deadline=started + cfg.run.time_budget_s - 5, max_faults=max_faults)
        reports: Counter[int] = Counter()
        after_last: list[int] = []

        def on_step(version: int, svc) -> None:
            reports[version] += 1
            if not chaos.redis_url:
                chaos.redis_url, chaos.redis_server = svc.redis_url, svc.redis
                chaos.start()
            if chaos.done.is_set():  # the run has shown it recovered: end it (the loop re-reads max_steps)
                after_last.append(version)
                if len(after_last) >= 2:
                    cfg.run.max_steps = version

        try:
            result = train(cfg, on_step=on_step)
        finally:
            chaos.stopped.set()
            if chaos.ident is not None:  # started by the first step: a run with none never starts it
                chaos.join(timeout=600)
        counted = tally(out / cfg.run.name, cfg.stream.key)
        counted.steps_redone = sum(n - 1 for n in reports.values())
        counted.faults, counted.errors = chaos.faults, chaos.errors
        counted.redis_restarts = chaos.redis_server.restarts if chaos.redis_server else 0
        # A cross-check, not a source: the driver's last report of each version up to the final
        # step names the groups the commits name (a version past it was trained by a learner that
        # died, and the run ended before its successor got that far again).
        reported = {g for v, ids in result.trained_groups.items() if v <= counted.final_step for g in ids}
        counted.driver_agrees = reported == counted.trained_ids
        return counted


def _ratio_lower_better(ours: float, target: float) -> float:
    return 1.0 if ours == target else target / ours


def report(t: Tally, minutes: float, seed: int) -> None:
    kinds = Counter(f.kind for f in t.faults)
    print(f"chaos run: {minutes:g} min, seed {seed}, {len(t.faults)} faults "
          f"({', '.join(f'{kinds[k]} {k}' for k in KINDS)}), Redis restarted {t.redis_restarts} times")
    for f in t.faults:
        print(f"  {f.seconds:7.0f} s  kill -9 {f.target} (pid {f.pid})")
    for e in t.errors:
        print(f"  not injected: {e}")
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(t.dropped.items())) or "none"
    rows = [("groups produced", t.produced), ("groups trained", t.trained),
            ("groups dropped (by reason)", f"{sum(t.dropped.values())} ({dropped})"),
            ("dead letters", t.dead), ("left in the stream", f"{t.left} ({t.pending} read, not yet trained)"),
            ("groups lost", len(t.lost)), ("groups trained twice", len(t.twice)),
            ("records disagree", len(t.unknown)), ("commits", t.commits),
            ("driver's step reports agree", t.driver_agrees),
            ("steps redone", t.steps_redone), ("final step", t.final_step)]
    for name, value in rows:
        print(f"{name:<28} {value}")
    if t.lost or t.twice or t.unknown:
        print(f"lost: {t.lost[:10]}  twice: {t.twice[:10]}  disagree: {t.unknown[:10]}")
    print(f"RESULT chaos_lost ours={len(t.lost)} baseline=0 ratio={_ratio_lower_better(len(t.lost), 0):.2f}")
    print(f"RESULT chaos_trained_twice ours={len(t.twice)} baseline=0 "
          f"ratio={_ratio_lower_better(len(t.twice), 0):.2f}")
    print(f"RESULT chaos_faults ours={len(t.faults)} baseline=10 ratio={len(t.faults) / 10:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10, help="the run's time budget")
    parser.add_argument("--seed", type=int, default=0, help="seeds the gaps and the victims")
    parser.add_argument("--min-gap", type=float, default=30, help="seconds between faults, at least")
    parser.add_argument("--max-gap", type=float, default=90, help="seconds between faults, at most")
    parser.add_argument("--max-faults", type=int, default=None, help="end the run two steps after this many")
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--out", default=None, help="keep the run folder here (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    t = run_chaos(args.minutes, args.seed, args.min_gap, args.max_gap, args.overrides, args.out,
                  max_faults=args.max_faults, config=args.config)
    report(t, args.minutes, args.seed)


if __name__ == "__main__":
    main()
