"""What a run says about its evaluations, through a real MLflow store (sqlite under tmp_path)."""

from __future__ import annotations

import mlflow
import numpy as np

from estuary.eval_stats import summarise
from estuary.run_log import RunLog


def test_the_start_evaluation_names_an_environment_with_almost_nothing_to_sharpen(tmp_path, capsys):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # its own, not the default: an earlier test may leave another store's experiment active, and
    # the default artifact location is ./mlruns in the working directory (the checkout)
    experiment = mlflow.create_experiment("run-log-test", artifact_location=(tmp_path / "artifacts").as_uri())
    rarely = summarise(np.full((200, 1), -0.01), np.arange(200)[:, None] == 0, k=1)  # 1 of 200
    sometimes = summarise(np.zeros((4, 1)), np.array([[True], [False], [False], [False]]), k=1)
    results = {"tool_use": rarely, "tool_use:budget8": rarely, "code": sometimes}
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            log = RunLog(run, "run: {}\n", {"run": {"seed": 0}}, tmp_path, max_steps=1)
            log.evaluation(results, 0, "start")
            start = capsys.readouterr().out
            log.evaluation(results, 1, "end")  # after RL the comparison says it: no second warning
            end = capsys.readouterr().out
    finally:
        mlflow.set_tracking_uri(previous)
    assert "eval (start): tool_use: 1 of 200 held-out samples right" in start
    assert "code: " not in start and "budget8: " not in start
    assert "held-out samples right" not in end


def test_workers_counters_sum_but_batch_sizes_and_draft_depths_take_the_largest():
    from estuary.train import merge_counters

    a = {"groups": 3, "mtp/drafted": 10, "mtp/crossover": 4, "mtp/depth_b1": 2, "mtp/depth_b4": 1}
    b = {"groups": 2, "mtp/drafted": 6, "mtp/crossover": 2, "mtp/depth_b1": 1, "mtp/depth_b8": 0}
    assert merge_counters([a, b]) == {"groups": 5, "mtp/drafted": 16, "mtp/crossover": 4, "mtp/depth_b1": 2,
                                      "mtp/depth_b4": 1, "mtp/depth_b8": 0}
