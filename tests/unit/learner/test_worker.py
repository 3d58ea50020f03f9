"""The learner loop against a real embedded Redis: filters, commits, publication, exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.errors import ConfigError
from configs.schema import LearnerConfig
from learner.checkpoint import commit_records
from learner.worker import LearnerWorker
from models.policy import init_policy
from streams.redis_server import EmbeddedRedis
from streams.redis_stream import Entry, TrajectoryStream
from streams.trajectory import POLICY, PROMPT, Trajectory, TrajectoryGroup
from weights_sync.local import SharedMemoryWeightSync

ROOT = Path(__file__).resolve().parents[3]


def make_group(seed: int, rewards=(1.0, 0.0, 0.5, 0.0), version: int = 0, env: str = "estuary/math",
               finish: str = "stop") -> TrajectoryGroup:
    """G samples of one prompt with made-up tokens and log-probs (deterministic per seed)."""
    gen = np.random.default_rng(seed)
    prompt = list(gen.integers(5, 60, 4))
    samples = []
    for r in rewards:
        response = list(gen.integers(30, 90, int(gen.integers(3, 7))))
        ids = np.array(prompt + response)
        mask = np.array([PROMPT] * len(prompt) + [POLICY] * len(response), np.uint8)
        logp = np.where(mask == POLICY, -gen.uniform(3, 6, len(ids)), 0.0)
        samples.append(Trajectory(ids, mask, logp, np.where(mask == POLICY, version, -1), reward=r,
                                  finish_reason=finish))
    return TrajectoryGroup(env, f"p{seed}", samples, group_id=f"g{seed}-{version}")


def _cfg(**kw) -> LearnerConfig:
    base = dict(backend="torch", lr=1e-3, groups_per_step=2, micro_batch_tokens=64, checkpoint_every=2,
                max_staleness=2)
    return LearnerConfig(**{**base, **kw})


def test_step_filters_publishes_and_acknowledges_only_after_the_checkpoint(tmp_path):
    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        groups = [make_group(0), make_group(1, rewards=(1.0, 1.0, 1.0, 1.0)),  # no signal
                  make_group(2), make_group(3), make_group(4), make_group(5)]
        for g in groups:
            producer.publish(g)
        sync = SharedMemoryWeightSync(tmp_path / "weights")
        stream = TrajectoryStream(server.url, consumer="learner-0")
        worker = LearnerWorker(_cfg(max_staleness=1), init_policy("tiny-hybrid-moe", seed=0), stream, tmp_path / "run", sync=sync)
        assert sync.latest_version() == 0  # engines can start from the learner's weights at once
        first = worker.step(timeout_s=10)
        assert first.version == 1 and [g.group_id for g in first.groups] == ["g0-0", "g2-0"]
        assert worker.counters["dropped_zero_variance"] == 1
        assert first.stats["trained_tokens"] > 0 and first.stats["grad_norm"] > 0
        assert sync.latest_version() == 1
        assert stream.pending() == 2  # trained on, not yet committed; the dropped group was acked at once
        second = worker.step(timeout_s=10)
        assert second.version == 2 and stream.pending() == 0  # checkpoint at step 2, then XACK
        assert (tmp_path / "run/checkpoints/LATEST").read_text() == "step-000002"
        assert [r["groups"] for r in commit_records(tmp_path / "run")] == [["g0-0", "g2-0", "g3-0", "g4-0"]]
        # staleness: at version 2 the last group (from version 0) is past max_staleness=1
        producer.publish(make_group(9, version=2))
        assert worker.step(timeout_s=3) is None  # 1 usable group left, 2 needed: no step
        assert worker.counters["dropped_stale"] == 1 and len(worker._kept) == 1
        # what was settled untrained is on record, with the reason, in the stream itself
        assert stream.dropped() == {"g1-0": "zero_variance", "g5-0": "stale"}
        sync.close()


def test_a_step_without_waiting_takes_what_the_stream_holds_and_keeps_it(tmp_path):
    """Sync mode's `step(timeout_s=0)`: the rollouts are done, so waiting only loses time."""
    import time

    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        for g in (make_group(0), make_group(1, rewards=(1.0, 1.0, 1.0, 1.0)), make_group(2)):
            producer.publish(g)
        worker = LearnerWorker(_cfg(groups_per_step=3), init_policy("tiny-hybrid-moe", seed=0),
                               TrajectoryStream(server.url, consumer="learner-0"), tmp_path / "run")
        start = time.monotonic()
        assert worker.step(timeout_s=0) is None  # 3 usable groups needed, 3 published (one dropped)
        assert time.monotonic() - start < 0.5 and len(worker._kept) == 2
        producer.publish(make_group(3))
        report = worker.step(timeout_s=0)
        assert report is not None and [g.group_id for g in report.groups] == ["g0-0", "g2-0", "g3-0"]


def test_downweighted_stale_groups_and_overlong_filter(tmp_path):
    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        producer.publish(make_group(0, version=1, finish="length"))
        producer.publish(make_group(1, version=5))
        cfg = _cfg(stale_policy="downweight", overlong_filter=True, checkpoint_every=0)
        worker = LearnerWorker(cfg, init_policy("tiny-attention", seed=0),
                               TrajectoryStream(server.url, consumer="l"), tmp_path)
        worker.version = 5
        kept = worker.collect(timeout_s=10)
        assert [round(scale, 3) for _, scale, _ in kept] == [round(1 / 3, 3), 1.0]  # 4 old, limit 2
        groups = worker._groups(kept)  # the cut group's samples are left out, none of them trained
        assert len(groups) == 1 and groups[0][0] == kept[1][0].group.samples
        assert worker.counters["overlong_masked"] == 4
        mixed = make_group(2, rewards=(1.0, 0.0, 0.0, 0.0))
        mixed.samples[1].finish_reason = "length"  # a cut sample: its advantage came from the whole group
        (samples, advantages, _env), = worker._groups([(Entry("2-0", mixed), 1.0, 0)])
        full = worker._groups([(Entry("2-0", make_group(2, rewards=(1.0, 0.0, 0.0, 0.0))), 1.0, 0)])[0][1]
        assert samples == [mixed.samples[i] for i in (0, 2, 3)] and advantages == [full[i] for i in (0, 2, 3)]
        # an environment may keep its cut samples (`environments.<name>.overlong_filter: false`)
        worker.env_overlong_filter = {"estuary/code": False}
        code = make_group(2, rewards=(1.0, 0.0, 0.0, 0.0), env="estuary/code")
        code.samples[1].finish_reason = "length"
        (samples, advantages, _env), = worker._groups([(Entry("3-0", code), 1.0, 0)])
        assert samples == code.samples and advantages == full  # trained, its advantage negative


def test_kl_anchor_groups_train_zero_variance_groups_for_the_kl_alone(tmp_path):
    """`kl_anchor_groups`: all-equal groups of environments with a KL join the step, at most that
    many and with zero advantage; the rest are dropped as before, and every joined group is
    committed like a trained one."""
    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        flat = (0.0, 0.0, 0.0, 0.0)
        groups = [make_group(0), make_group(1, rewards=flat), make_group(2, rewards=flat, env="estuary/nokl"),
                  make_group(3, rewards=flat), make_group(4, rewards=flat, finish="length"), make_group(5)]
        for g in groups:
            producer.publish(g)
        cfg = _cfg(kl_coef=0.1, kl_anchor_groups=2, overlong_filter=True, checkpoint_every=0)
        stream = TrajectoryStream(server.url, consumer="l")
        worker = LearnerWorker(cfg, init_policy("tiny-attention", seed=0), stream, tmp_path,
                               env_kl_coef={"estuary/nokl": 0.0})
        kept = worker.collect(timeout_s=10)
        # two informative groups, then the two newest anchors (g1 is the oldest of three: dropped)
        assert [(e.group.group_id, scale) for e, scale, _ in kept] == [
            ("g0-0", 1.0), ("g5-0", 1.0), ("g3-0", 0.0), ("g4-0", 0.0)]
        assert stream.dropped() == {"g1-0": "zero_variance", "g2-0": "zero_variance"}
        trained = worker._groups(kept)
        # the cut samples of g4 stay, for their KL term: every anchor row has advantage 0
        assert [len(s) for s, _, _ in trained] == [4, 4, 4, 4]
        assert all(a == 0.0 for _, adv, _ in trained[2:] for a in adv)
        assert any(a != 0.0 for a in trained[0][1])
        assert worker.counters["kl_anchor_groups"] == 2
        # without a KL term there is nothing to anchor: the cut samples leave the loss as before
        assert worker._anchors_kl(groups[2]) is False


@pytest.mark.parametrize(("kl_coef", "estimator"), [(0.0, "k2"), (0.1, "k2"), (0.1, "full")])
def test_anchor_rows_move_the_policy_by_the_kl_alone(kl_coef, estimator):
    """Rows of zero advantage, a policy that has drifted from its reference: without a KL term
    the step changes no weight; with one, every step brings the policy back toward the reference."""
    from learner.batching import pack
    from learner.trainer import Trainer, TrainerOptions
    from learner.worker import objective_from

    policy = init_policy("tiny-attention", seed=0)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=3e-3, weight_decay=0.0,
                                                   keep_reference=True))
    with torch.no_grad():  # drift: the policy is no longer its reference
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    group = make_group(7, rewards=(0.0,) * 4)
    batches = pack(group.samples, [0.0] * 4, 256, 0)
    objective = objective_from(_cfg(kl_coef=kl_coef, kl_anchor_groups=2, kl_estimator=estimator))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    kls = [trainer.train(batches, objective)[0].get("kl", 0.0) for _ in range(4)]
    moved = any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    if kl_coef == 0.0:
        assert not moved
    else:
        assert moved and kls[-1] < kls[0], kls


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_a_row_without_policy_tokens_changes_no_step(aggregation):
    """Leaving a cut sample out equals training it with its loss mask cleared: the same update."""
    from learner.batching import pack
    from learner.trainer import Trainer, TrainerOptions
    from learner.worker import objective_from

    group = make_group(3, rewards=(1.0, 0.0, 0.5, 0.0))
    cut = group.samples[1]
    masked = Trajectory(cut.token_ids, np.where(cut.loss_mask == POLICY, PROMPT, cut.loss_mask).astype(np.uint8),
                        cut.logprobs, cut.versions, cut.reward)
    adv = [1.0, -0.5, 0.3, -0.8]
    objective = objective_from(_cfg(kl_coef=0.1, loss_aggregation=aggregation))
    weights = []
    for samples, advantages in (([group.samples[0], masked, *group.samples[2:]], adv),
                                ([group.samples[0], *group.samples[2:]], [adv[0], *adv[2:]])):
        policy = init_policy("tiny-attention", seed=0)
        trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3, keep_reference=True))
        trainer.step(pack(samples, advantages, max_tokens=64), objective)
        weights.append(torch.cat([p.detach().reshape(-1) for p in policy.model.parameters()]))
    # float32 summation order only (2-3e-7 measured); a row that trained would move weights by ~lr
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def _with_parts(seed: int, parts: list[dict[str, float]]) -> TrajectoryGroup:
    group = make_group(seed, rewards=[sum(p.values()) for p in parts])
    for sample, p in zip(group.samples, parts, strict=True):
        sample.reward_parts = p
    return group


def test_advantages_follow_the_task_reward_and_shaping_keeps_its_own_scale(tmp_path):
    """A group that differs only by a 0.1 format bonus or a -0.1 malformed-call penalty must not
    get advantages as loud as right-vs-wrong (the learner reads no stream before a step)."""
    worker = LearnerWorker(_cfg(), init_policy("tiny-attention", seed=0), None, tmp_path)
    wrong, formatted, malformed = {"correct": 0.0}, {"correct": 0.0, "format": 0.1}, {"correct": 0.0, "penalty": -0.1}
    shaping_only = _with_parts(0, [formatted, wrong, formatted, malformed])
    right_wrong = _with_parts(1, [{"correct": 1.0, "format": 0.1}, formatted, {"correct": 1.0}, wrong])
    assert worker._admit(shaping_only)[0]  # kept by dynamic sampling: it carries signal at its scale
    groups = worker._groups([(Entry("1-0", shaping_only), 1.0, 0), (Entry("2-0", right_wrong), 1.0, 0)])
    adv = [a for _, advantages, _ in groups for a in advantages]
    assert adv[:4] == pytest.approx([0.075, -0.025, 0.075, -0.125], abs=1e-5)
    unit = 0.5 / (1 / 3) ** 0.5  # grpo's advantage of correct 1, 0, 1, 0
    assert adv[4:] == pytest.approx([unit + 0.05, -unit + 0.05, unit - 0.05, -unit - 0.05], abs=1e-4)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_each_environment_gets_its_own_kl_coefficient(tmp_path, share_prompt):
    """`environments.<name>.kl_coef` reaches every row of that environment's groups, in either
    packing; the reference is kept when only an environment asks for a KL."""
    cfg = _cfg(kl_coef=0.0, share_prompt=share_prompt, micro_batch_tokens=4096)
    worker = LearnerWorker(cfg, init_policy("tiny-attention", seed=0), None, tmp_path,
                           env_kl_coef={"estuary/long_context": 0.0, "estuary/math": 0.2})
    assert worker.trainer.reference is not None
    groups = [make_group(0, env="estuary/math"), make_group(1, env="estuary/long_context"),
              make_group(2, env="estuary/code")]
    batches = worker._pack(worker._groups([(Entry(f"{i}-0", g), 1.0, 0) for i, g in enumerate(groups)]))
    by_prompt = {tuple(g.samples[0].token_ids[:4].tolist()): c for g, c in zip(groups, (0.2, 0.0, 0.0), strict=True)}
    rows = [(tuple(b.input_ids[r, :4].tolist()), float(b.kl_coef[r])) for b in batches for r in range(len(b.kl_coef))]
    assert len(rows) == 12 and all(c == pytest.approx(by_prompt[p]) for p, c in rows)
    plain = LearnerWorker(_cfg(kl_coef=0.0), init_policy("tiny-attention", seed=0), None, tmp_path / "plain")
    assert plain.trainer.reference is None  # no override, no KL: no reference, no per-row coefficients
    assert all(b.kl_coef is None for b in plain._pack(plain._groups([(Entry("0-0", groups[0]), 1.0, 0)])))


def test_the_learner_takes_the_samplers_temperature_and_top_p_from_the_config(tmp_path):
    from configs import load_config
    from configs.runtime import sync_channel
    from estuary.run_setup import learner_spec
    from learner.actor import build_learner
    from models.policy import write_preset

    cfg = load_config("tiny_cpu", ["rollout.sampling.temperature=0.7", "rollout.sampling.top_p=0.9",
                                   "learner.backend=torch", "model.mtp_loss_coef=0",
                                   "environments.long_context.kl_coef=0",
                                   "environments.code.overlong_filter=false"])
    write_preset("tiny-attention", tmp_path / "policy")
    with EmbeddedRedis() as server:
        channel = sync_channel(cfg, tmp_path / "run")
        worker = build_learner(learner_spec(cfg, tmp_path / "run", tmp_path / "policy", server.url, channel))
        worker.sync.close()
    assert (worker.objective.temperature, worker.objective.top_p, worker.objective.top_k) == (0.7, 0.9, 0)
    assert worker.env_kl_coef == {"estuary/long_context": 0.0}  # `environments.<name>.kl_coef`, by env id
    assert worker.env_overlong_filter == {"estuary/code": False}  # and `.overlong_filter`
    with pytest.raises(ConfigError, match="kl_coef"):
        load_config("tiny_cpu", ["environments.math.kl_coef=-0.1"])
    with pytest.raises(ConfigError, match="logprob_chunk=64 never holds"):
        load_config("tiny_cpu", ["learner.kl_estimator=full", "learner.logprob_chunk=64"])


def test_a_resumed_learner_completes_the_commit_record_and_does_not_rewrite_its_checkpoint(tmp_path):
    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        for seed in range(4):
            producer.publish(make_group(seed))
        run = tmp_path / "run"
        worker = LearnerWorker(_cfg(), init_policy("tiny-attention", seed=0),
                               TrajectoryStream(server.url, consumer="learner-0", redeliver_own=True), run)
        worker.step(timeout_s=10)
        worker.step(timeout_s=10)  # commits step 2
        # as if killed between writing the checkpoint and its record
        (run / "checkpoints/commits/step-000002.json").unlink()
        resumed = LearnerWorker(_cfg(), init_policy("tiny-attention", seed=0),
                                TrajectoryStream(server.url, consumer="learner-0", redeliver_own=True), run)
        assert resumed.version == 2
        assert [r["groups"] for r in commit_records(run)] == [["g0-0", "g1-0", "g2-0", "g3-0"]]
        latest = run / "checkpoints/step-000002"
        written = (latest / "meta.json").stat().st_mtime_ns
        # restarted during the driver's final call: nothing new to commit, nothing rewritten
        assert resumed.finish() == latest and (latest / "meta.json").stat().st_mtime_ns == written


LEARNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_worker import _cfg
    from learner.worker import LearnerWorker
    from models.policy import init_policy
    from streams.redis_stream import TrajectoryStream

    url, run_dir, total, pause_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    stream = TrajectoryStream(url, key=run_dir, consumer="learner-0", redeliver_own=True)
    worker = LearnerWorker(_cfg(max_staleness=100), init_policy("tiny-hybrid-moe", seed=0), stream, run_dir)
    print("resumed at", worker.version, flush=True)
    while worker.version < total:
        report = worker.step(timeout_s=30)
        print("step", report.version, [g.group_id for g in report.groups], flush=True)
        if report.version == pause_after:
            time.sleep(60)  # the test kills the process here: step 3 trained, not yet committed
    worker.finish()
    worker.policy.save(run_dir + "/final")
    print("done", flush=True)
""")


def _learner(url: str, run_dir: Path, total: int, pause_after: int = -1) -> subprocess.Popen:
    code = LEARNER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, url, str(run_dir), str(total), str(pause_after)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_killed_learner_resumes_exactly_and_trains_nothing_twice(tmp_path):
    total = 5
    with EmbeddedRedis() as server:
        for run in ("straight", "killed"):
            producer = TrajectoryStream(server.url, key=str(tmp_path / run), consumer="rollout")
            for seed in range(2 * total):
                producer.publish(make_group(seed))
        straight = _learner(server.url, tmp_path / "straight", total)
        straight_log = straight.communicate(timeout=300)[0]
        assert straight_log.strip().endswith("done"), straight_log

        killed = _learner(server.url, tmp_path / "killed", total, pause_after=3)
        log = []
        for line in killed.stdout:
            log.append(line)
            if line.startswith("step 3"):
                os.kill(killed.pid, signal.SIGKILL)
                break
        killed.wait(timeout=30)
        resumed = _learner(server.url, tmp_path / "killed", total)
        resumed_log = resumed.communicate(timeout=300)[0]
        assert "resumed at 2" in resumed_log
        # step 3 is re-trained on the same groups, from the redelivered, unacknowledged entries
        assert [s for s in resumed_log.splitlines() if s.startswith("step 3")] == \
               [s.strip() for s in log if s.startswith("step 3")]
        stream = TrajectoryStream(server.url, key=str(tmp_path / "killed"), consumer="check")
        assert stream.pending() == 0 and stream.depth() == 0
        assert stream.client.scard(f"{tmp_path / 'killed'}:published") == 2 * total
    # the commit records name every group once, though step 3 was trained twice
    trained = [g for r in commit_records(tmp_path / "killed") for g in r["groups"]]
    assert sorted(trained) == sorted(f"g{seed}-0" for seed in range(2 * total))
    a = load_file(tmp_path / "straight/final/model.safetensors")
    b = load_file(tmp_path / "killed/final/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_an_engine_picks_up_the_published_version_and_tags_its_tokens(tmp_path):
    from rollout.torch_engine import TorchEngine
    from rollout.types import Request, SamplingParams

    with EmbeddedRedis() as server:
        producer = TrajectoryStream(server.url, consumer="rollout")
        for seed in range(2):
            producer.publish(make_group(seed))
        learner_sync = SharedMemoryWeightSync(tmp_path / "weights")
        worker = LearnerWorker(_cfg(), init_policy("tiny-hybrid-moe", seed=0),
                               TrajectoryStream(server.url, consumer="l"), tmp_path / "run", sync=learner_sync)
        engine = TorchEngine(init_policy("tiny-hybrid-moe", seed=0), max_batch=2, max_len=64)  # its own copy
        engine_sync = SharedMemoryWeightSync(tmp_path / "weights")
        assert worker.step(timeout_s=10).version == 1
        update = engine_sync.pull(newer_than=engine.version)
        engine.update_weights(update.weights, update.version)
        sample = engine.generate([Request([5, 6, 7], SamplingParams(max_new_tokens=4))])[0][0]
        assert set(sample.versions) == {1}
        learned = worker.policy.model.state_dict()
        assert all(torch.equal(v, learned[k]) for k, v in engine.model.state_dict().items())
        engine_sync.close()
        learner_sync.close()
