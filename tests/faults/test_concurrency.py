"""Issue 15: two overlapping pipeline runs against one real ``mlflow server`` on loopback race to
register and promote. Each racer is a process running the pipeline's register and promote steps
(the same functions the KFP components call) once both are ready; both were evaluated against
the same champion and both pass the gate against it. Whatever the order the registry serves
them in, the better one ends as ``champion`` and ``previous_champion`` is the one it replaced.

The racers' evaluations are made up (registry_kit): training and evaluating two models costs
minutes on 2 cores and the race is about the registry, not the model."""

from __future__ import annotations

import multiprocessing as mp

import mlflow
import pytest

from components.register.promote import CHAMPION, PREVIOUS, promote_checked
from tests.conftest import mlflow_server
from tests.faults.registry_kit import CFG, race, register_version

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_two_runs_racing_to_promote_leave_the_better_as_champion(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as uri:
        client = mlflow.MlflowClient(uri)
        _, v1 = register_version(uri, str(tmp_path / "v1"), hits=20)
        promote_checked(client, CFG.model_name, v1["version"], "", CFG)
        ctx = mp.get_context("spawn")
        start, results = ctx.Barrier(2), ctx.Queue()
        racers = [ctx.Process(target=race, args=(uri, str(tmp_path / name), hits,
                                                 (v1["version"], 20), start, results))
                  for name, hits in (("worse", 35), ("better", 55))]
        for p in racers:
            p.start()
        for p in racers:
            p.join(timeout=300)
        assert all(p.exitcode == 0 for p in racers), [p.exitcode for p in racers]
        done = {hits: (version, decision, promoted)
                for hits, version, decision, promoted in (results.get() for _ in racers)}
        worse, better = done[35][0], done[55][0]
        assert done[35][1] == done[55][1] == "promote"  # both passed the gate against v1
        champion = str(client.get_model_version_by_alias(CFG.model_name, CHAMPION).version)
        previous = str(client.get_model_version_by_alias(CFG.model_name, PREVIOUS).version)
        assert champion == better
        if done[35][2]:  # the worse one moved first; the better was decided again and won
            assert previous == worse
        else:  # the better one moved first; the worse one was held with the reason
            assert previous == v1["version"]
            tags = client.get_model_version(CFG.model_name, worse).tags
            assert "moved from" in tags["promotion_refused"]
