"""Faults around training checkpoints (issue 15, items 6 and 9): a gradient that turns NaN, a
checkpoint folder of another data set, a complete checkpoint whose shard is corrupt, a marker
written before its shards reached the disk.

One tiny one-process run (the ``first`` fixture: two steps, a checkpoint after each) is shared;
the tests copy its checkpoint folder and run again on it. The rest calls ``checkpoint.py``
directly."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from components.common.canonical import derive_canonical, load_canonical
from components.common.config import resolve
from components.common.readers import read_dataset, write_canonical
from components.common.tracking import create_run
from components.train import worker
from components.train.checkpoint import MARKER, CheckpointStore, probe, step_name
from components.train.run import CheckpointMismatch, NonFiniteGradient, run
from model import NoteLLM2

pytestmark = pytest.mark.faults

BASE = ["model.variant=text_only", "train.batch_pairs=4", "train.log_every=1",
        "train.checkpoint_every=1", "train.max_steps=2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, demo_dir):
    """The canonical data, a second data set and one MLflow store. The second pairs the same
    notes otherwise (two targets swapped): the tiny tokenizer, learnt from the paired notes,
    comes out the same, as a pretrained one would for any data, so nothing but the
    fingerprint tells the two apart."""
    root = tmp_path_factory.mktemp("faults-ckpt")
    canon = str(root / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    _, pairs, _ = load_canonical(canon)
    train = pairs["train"].copy()
    train.loc[[0, 1], "target_id"] = train.loc[[1, 0], "target_id"].to_numpy()
    other = str(root / "canon-other")
    derive_canonical(canon, other, pairs={**pairs, "train": train})
    return {"root": root, "canon": canon, "other": other,
            "uri": f"sqlite:///{root}/mlflow.db"}


def _run(work, out: str, overrides: list[str], canon: str | None = None) -> dict:
    return run(canon or work["canon"], out, resolve("tiny", [*BASE, *overrides]),
               tracking_uri=work["uri"], run_id=create_run(work["uri"], "faults", "", {}),
               progress=False)


def _weights(path: str) -> dict[str, torch.Tensor]:
    return NoteLLM2.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def first(work):
    """Two steps, checkpointed after each, with every fsync recorded (path, in order)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    out, ckpt = str(work["root"] / "first" / "model"), str(work["root"] / "first" / "ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        _run(work, out, [f"train.checkpoint_dir={ckpt}"])
    return {"out": out, "ckpt": ckpt, "synced": synced}


def _copy_checkpoints(first, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(first["ckpt"], dst)
    return dst


# -- item 6: non-finite gradients ---------------------------------------------------------------


def _nan_gradient_at(monkeypatch, step: int) -> None:
    """The temperature's gradient turns NaN in the backward pass of optimizer step ``step``
    (one micro-batch per step); the loss stays finite."""
    real = worker.engine_module

    def engine_module(model, ds, stage):
        objective = real(model, ds, stage)
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == step else grad

        model.log_scale.register_hook(hook)
        return objective

    monkeypatch.setattr(worker, "engine_module", engine_module)


@pytest.mark.parametrize("engine", ["plain", "zero2"])
def test_a_nan_gradient_stops_the_run_and_its_step_is_never_marked_complete(
        engine, work, tmp_path, monkeypatch):
    """plain: one process on the plain engine (stage 0, fp32), which applied the NaN update
    (every weight NaN) and marked that checkpoint complete. zero2: ZeRO-2 with offload, whose
    optimizer skipped the step without a word and went on to publish and export."""
    _nan_gradient_at(monkeypatch, step=2)
    out, ckpt = str(tmp_path / "model"), str(tmp_path / "ckpt")
    extra = ["train.zero_stage=2", "train.offload=true"] if engine == "zero2" else []
    with pytest.raises(NonFiniteGradient, match=r"non-finite gradient norm \((nan|inf)\) at step 2"):
        _run(work, out, [f"train.checkpoint_dir={ckpt}", "train.max_steps=3", *extra])
    store = CheckpointStore(ckpt)
    assert store.complete_steps() == [1]
    assert not os.path.exists(out)  # nothing exported
    with open(store.diagnostic(2)) as f:
        diag = json.load(f)
    assert diag["kind"] == "gradient" and diag["step"] == 2
    assert diag["ranks"][0]["grad_norm"] in ("nan", "inf") and diag["ranks"][0]["note_ids"]
    assert diag["last_complete_checkpoint"] == store.path(1)


# -- item 9a: the data is part of the fingerprint ----------------------------------------------


def test_a_run_on_other_data_refuses_the_old_runs_checkpoints(work, first, tmp_path):
    """The same configuration on other training pairs, pointed at the old run's checkpoint
    folder, used to resume at its last step, train nothing and export the old weights as its
    own. Now it refuses the folder and leaves it as it was."""
    ckpt = _copy_checkpoints(first, tmp_path)
    out = str(tmp_path / "model")
    with pytest.raises(CheckpointMismatch, match=r"other training data \(data\.sha256: "):
        _run(work, out, [f"train.checkpoint_dir={ckpt}"], canon=work["other"])
    assert not os.path.exists(out)
    assert CheckpointStore(ckpt).complete_steps() == [1, 2]


# -- item 9b: fall back past a checkpoint that does not load ------------------------------------


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(work, first, tmp_path, caplog):
    """Step 2's model shard is overwritten with garbage of the same size (the marker's sizes
    still agree): the rerun warns naming step 2, resumes from step 1, trains step 2 again to
    the first run's weights and replaces the bad folder. It used to fail in DeepSpeed's load."""
    ckpt = _copy_checkpoints(first, tmp_path)
    shard = os.path.join(ckpt, step_name(2), "ds", "mp_rank_00_model_states.pt")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.write(os.urandom(size))
    out = str(tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="components.train.worker"):
        _run(work, out, [f"train.checkpoint_dir={ckpt}"])
    warned = [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()]
    assert len(warned) == 1 and step_name(2) in warned[0] and step_name(1) in warned[0]
    a, b = _weights(first["out"]), _weights(out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    store = CheckpointStore(ckpt)
    assert store.complete_steps() == [1, 2] and probe(store.path(2)) is None


def test_the_marker_lists_sizes_and_a_short_or_missing_file_is_reported(tmp_path):
    store = CheckpointStore(str(tmp_path))
    tmp = store.prepare(1)
    os.makedirs(os.path.join(tmp, "ds"))
    for rel, n in (("ds/shard.pt", 1000), ("trainer_state.json", 2)):
        with open(os.path.join(tmp, rel), "wb") as f:
            f.write(b"{}" if rel.endswith(".json") else b"x" * n)
    store.publish(1, {})
    with open(os.path.join(store.path(1), MARKER)) as f:
        marker = json.load(f)
    assert marker["files"] == {"ds/shard.pt": 1000, "trainer_state.json": 2}
    assert store.check(1) is None
    os.truncate(os.path.join(store.path(1), "ds", "shard.pt"), 10)
    assert store.check(1) == "ds/shard.pt holds 10 bytes, 1000 were written"
    os.remove(os.path.join(store.path(1), "ds", "shard.pt"))
    assert store.check(1) == "ds/shard.pt is missing"


def test_prune_drops_the_checkpoints_of_an_abandoned_trajectory(tmp_path):
    """After a fall-back from step 4 to step 2, the resumed run's step 3 makes step 4 stale."""
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (2, 4, 3):
        store.prepare(step)
        store.publish(step, {})
    assert store.prune(current=3) == [step_name(4)]
    assert store.complete_steps() == [2, 3]


# -- item 9c: durable before marked ------------------------------------------------------------


def test_every_file_and_folder_is_on_disk_before_the_marker(first):
    """Each file of checkpoint 1 (under its staging name), its folders and the rename are
    fsynced before the marker; the marker and its folder after. Only the marker was, before."""
    synced, root = first["synced"], first["ckpt"]
    staging, final = os.path.join(root, ".tmp-" + step_name(1)), os.path.join(root, step_name(1))
    marker = min(i for i, p in enumerate(synced)
                 if p in (os.path.join(final, MARKER + ".tmp"), os.path.join(final, MARKER)))
    before, after = synced[:marker], synced[marker + 1:]
    files = []
    for base, _, names in os.walk(final):
        files += [os.path.relpath(os.path.join(base, n), final) for n in names if n != MARKER]
    assert len(files) >= 3  # ds/ model and optimizer states, trainer state, rng
    missing = [f for f in files if os.path.join(staging, f) not in before]
    assert not missing, missing
    assert {staging, os.path.join(staging, "ds"), root} <= set(before)
    assert before.index(root) > max(before.index(os.path.join(staging, f)) for f in files)
    assert final in after[:2]


def test_a_job_whose_lease_another_job_holds_never_publishes_a_checkpoint(work, tmp_path,
                                                                          monkeypatch):
    """A TrainJob left running by a killed task (its lease taken over by the retry's job)
    stops at its next checkpoint instead of writing over the new job's."""
    from components.train import lease

    ckpt = str(tmp_path / "ckpt")
    lease.Lease(ckpt, "ns/the-retry", ttl_s=600).acquire()
    monkeypatch.setenv(lease.OWNER_ENV, "ns/the-killed-task")
    with pytest.raises(lease.LeaseLost, match="the-retry"):
        _run(work, str(tmp_path / "model"), [f"train.checkpoint_dir={ckpt}"])
    assert not [d for d in os.listdir(ckpt) if d.startswith("step")]
