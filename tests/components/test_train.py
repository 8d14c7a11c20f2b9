import json
import os

import mlflow
import numpy as np
import pytest
import torch

from components.common.canonical import load_canonical
from components.common.config import resolve
from components.common.notes import LazyNotes
from components.common.readers import read_dataset, write_canonical
from components.common.tracking import create_run, step_runs
from components.train.run import PixelCache, run
from model import NoteLLM2, build_model
from model.collator import NoteCollator


def test_training_lowers_the_loss_and_exports(demo_dir, tmp_path):
    canon, out = str(tmp_path / "canon"), str(tmp_path / "model")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "t", "", {})
    cfg = resolve("tiny", ["train.max_steps=40", "train.batch_pairs=16", "train.log_every=5",
                           "train.val_every=20"])
    run(canon, out, cfg, tracking_uri=uri, run_id=run_id, progress=False)
    # curves in the train step's run nested under the pipeline's, the config on the latter
    train_run = step_runs(uri, run_id)["train"]
    assert train_run.data.tags["mlflow.parentRunId"] == run_id
    assert mlflow.MlflowClient(uri).get_run(run_id).data.params["train.max_steps"] == "40"
    run_id = train_run.info.run_id
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    assert mlflow.MlflowClient(uri).get_metric_history(run_id, "val/loss")
    assert NoteLLM2.from_pretrained(out).config.image_size == 32


def test_pixel_cache_equals_fresh_pixels_and_keeps_its_budget(demo_dir, tmp_path):
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    notes, _, _ = load_canonical(canon)
    lazy = LazyNotes(notes["train"])
    model = build_model(resolve("tiny").model, corpus=["a b c"])
    collator = NoteCollator(model)
    one = 3 * 32 * 32 * 4
    cache = PixelCache(lazy, collator, max_bytes=2 * one + one // 2)  # room for 2 notes
    keys = [0, 1, 2, 0]
    got = cache.get(keys)
    want = collator.pixels([lazy.image(k) for k in keys])
    torch.testing.assert_close(got, want)
    assert cache.kept == 2 and cache.bytes == 2 * one and cache.decoded == 3
    torch.testing.assert_close(cache.get(keys), want)
    assert cache.decoded == 4  # only note 2, over the budget, is decoded again


def _count_decodes(lazy):
    """``lazy`` whose image reads also count in a shared array (visible across fork)."""
    import multiprocessing

    reads = multiprocessing.Array("i", len(lazy))
    image = lazy.image

    def counted(i):
        with reads.get_lock():
            reads[i] += 1
        return image(i)

    lazy.image = counted
    return reads


def test_pixel_cache_is_one_budget_shared_by_loader_workers_across_epochs(demo_dir, tmp_path):
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    notes, _, _ = load_canonical(canon)
    lazy = LazyNotes(notes["train"])
    n = len(lazy)
    reads = _count_decodes(lazy)
    collator = NoteCollator(build_model(resolve("tiny").model, corpus=["a b c"]))
    cache = PixelCache(lazy, collator, max_bytes=n * 3 * 32 * 32 * 4)  # every note fits
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=4, shuffle=True,
                                         num_workers=2, collate_fn=cache.get,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # workers are new each epoch; the cache lives on in this process
        for _batch in loader:
            pass
    assert cache.kept == n and cache.bytes <= n * 3 * 32 * 32 * 4
    assert list(reads) == [1] * n  # each photo decoded once, by whichever worker took it first
    torch.testing.assert_close(cache.get(range(n)),
                               collator.pixels([lazy.image(k) for k in range(n)]))


@pytest.mark.parametrize("variant", ["text_only", "mllm_basic", "late_fusion", "micl", "notellm2"])
def test_every_variant_trains_exports_and_embeds(variant, demo_dir, tmp_path):
    from components.embed.run import read_vectors
    from components.embed.run import run as embed

    canon, out = str(tmp_path / "canon"), str(tmp_path / "model")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = resolve("tiny", [f"model.variant={variant}", "train.max_steps=3",
                           "train.batch_pairs=4", "train.log_every=1"])
    final = run(canon, out, cfg, tracking_uri=uri, run_id=create_run(uri, "t", "", {}),
                progress=False)
    assert ("loss_v" in final) == (variant in ("micl", "notellm2"))
    assert NoteLLM2.from_pretrained(out).config.variant == variant
    embed(canon, out, str(tmp_path / "emb"), cfg, probes=False, progress=False)
    table, vectors = read_vectors(str(tmp_path / "emb" / "notes.parquet"))
    assert vectors.shape == (len(table), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_offloaded_zero2_trains_the_same_weights_as_the_plain_engine(demo_dir, tmp_path):
    """One process: ZeRO-2 with the optimizer state offloaded to CPU memory and gradient
    accumulation computes the same update as the plain engine (stage 0) on the same batches."""
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    weights = []
    for name, extra in (("plain", []), ("offload", ["train.zero_stage=2", "train.offload=true"])):
        cfg = resolve("tiny", ["train.max_steps=3", "train.batch_pairs=4", "train.grad_accum=2",
                               "model.variant=text_only", *extra])
        out = str(tmp_path / name / "model")
        run(canon, out, cfg, tracking_uri=uri, run_id=create_run(uri, "t", name, {}),
            progress=False)
        weights.append(NoteLLM2.from_pretrained(out).state_dict())
        ds = json.loads((tmp_path / name / "model" / "ds_config.json").read_text())
        assert ds["zero_optimization"]["stage"] == (2 if extra else 0)  # stage 0: one process
    plain, offload = weights
    for k, v in plain.items():
        torch.testing.assert_close(offload[k], v, rtol=0, atol=1e-6)


def test_a_rerun_continues_its_own_checkpoints_and_refuses_another_configs(demo_dir, tmp_path):
    from components.train.run import CheckpointMismatch

    canon, out = str(tmp_path / "canon"), str(tmp_path / "task" / "model")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["train.max_steps=2", "train.batch_pairs=4", "train.log_every=1",
            "model.variant=text_only"]
    first = run(canon, out, resolve("tiny", base), tracking_uri=uri,
                run_id=create_run(uri, "t", "", {}), progress=False)
    assert os.listdir(tmp_path / "task" / "checkpoints") == ["step-00000002"]
    # the same task again (a KFP retry): nothing left to train, the same model and metrics
    again_id = create_run(uri, "t", "", {})
    again = run(canon, out, resolve("tiny", base), tracking_uri=uri, run_id=again_id,
                progress=False)
    assert not mlflow.MlflowClient(uri).get_metric_history(again_id, "train/loss")
    # the same metrics, but for the host memory, which each attempt measures of its own process
    own = ("peak_rss_mib", "build_peak_rss_mib")
    assert {k: v for k, v in again.items() if k not in own} == pytest.approx(
        {k: v for k, v in first.items() if k not in own})
    assert set(own) <= set(again)
    with pytest.raises(CheckpointMismatch, match="train.lr"):
        run(canon, out, resolve("tiny", [*base, "train.lr=1e-4"]), tracking_uri=uri,
            run_id=create_run(uri, "t", "", {}), progress=False)
    run(canon, out, resolve("tiny", [*base, "train.lr=1e-4", "train.resume=false"]),
        tracking_uri=uri, run_id=create_run(uri, "t", "", {}), progress=False)
    assert NoteLLM2.from_pretrained(out).config.variant == "text_only"


# -- the reference recipe's options ------------------------------------------------------------


def test_learning_rate_schedules():
    from components.train.worker import lr_lambda

    total, warmup = 20, 2
    lin, cos, const = (lr_lambda(total, warmup, s) for s in ("linear", "cosine", "constant"))
    assert [lin(s) for s in (0, 1)] == [0.5, 1.0] == [cos(s) for s in (0, 1)]  # linear warmup
    assert lin(2) == 1.0 and lin(11) == pytest.approx(0.5) and lin(20) == 0.0
    assert cos(11) == pytest.approx(0.5) and cos(6) > lin(6)  # cosine decays slower at first
    assert [const(s) for s in (2, 11, 20)] == [1.0, 1.0, 1.0]


def test_export_best_writes_the_weights_of_the_lowest_validation_loss(demo_dir, tmp_path):
    """With train.export=best the model output holds the weights of the validation step with
    the lowest loss, not the last; the run says which step that was."""
    from components.train.checkpoint import BEST, MARKER

    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # a learning rate that first helps, then (no decay, huge steps) makes the loss worse
    base = ["train.max_steps=8", "train.batch_pairs=8", "train.val_every=2", "train.log_every=2",
            "train.warmup_ratio=0", "train.lr_schedule=constant", "train.lr=3e-2",
            "train.checkpoint_every=2"]
    outs = {}
    for export in ("last", "best"):
        out = str(tmp_path / export / "model")
        run_id = create_run(uri, "t", export, {})
        final = run(canon, out, resolve("tiny", [*base, f"train.export={export}"]),
                    tracking_uri=uri, run_id=run_id, progress=False)
        train_id = step_runs(uri, run_id)["train"].info.run_id
        val = {m.step: m.value
               for m in mlflow.MlflowClient(uri).get_metric_history(train_id, "val/loss")}
        outs[export] = (out, final, val)
    _, last_final, val = outs["last"]
    best_step = min(val, key=val.get)
    assert sorted(val) == [2, 4, 6, 8] and best_step != 8, val  # the premise of the test
    assert last_final["exported_step"] == 8
    best_out, best_final, best_val = outs["best"]
    assert best_val == pytest.approx(val, abs=1e-6)  # same trajectory: export changes nothing else
    assert best_final["exported_step"] == best_step
    kept = tmp_path / "best" / "checkpoints" / BEST
    assert json.loads((kept / MARKER).read_text())["step"] == best_step
    assert not os.path.exists(os.path.join(best_out, MARKER))
    # the exported weights are the checkpoint's of that step, not the last ones
    from components.train.checkpoint import step_name

    a = NoteLLM2.from_pretrained(best_out).state_dict()
    last = NoteLLM2.from_pretrained(outs["last"][0]).state_dict()
    assert any(not torch.equal(a[k], last[k]) for k in a)
    ckpt = torch.load(tmp_path / "best" / "checkpoints" / step_name(best_step) / "ds" /
                      "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for k, v in a.items():
        torch.testing.assert_close(v, ckpt["model." + k].reshape(v.shape), rtol=0, atol=0)


def test_horizontal_flips_are_deterministic_and_mirror_the_pixels():
    from types import SimpleNamespace

    from components.train.worker import Trainer

    trainer = SimpleNamespace(t=SimpleNamespace(seed=1, hflip=0.5), epoch=0, position=3, rank=0)
    px = torch.arange(8 * 3 * 2 * 4, dtype=torch.float32).reshape(8, 3, 2, 4)
    a, b = px.clone(), px.clone()
    Trainer._flip(trainer, a)
    Trainer._flip(trainer, b)
    torch.testing.assert_close(a, b)  # the same micro-batch flips the same images (resume)
    flipped = [i for i in range(8) if not torch.equal(a[i], px[i])]
    assert 0 < len(flipped) < 8
    for i in flipped:
        torch.testing.assert_close(a[i], px[i].flip(-1))
    trainer.position = 4
    c = px.clone()
    Trainer._flip(trainer, c)
    assert not torch.equal(c, a)


def test_concat_fusion_trains_on_look_alikes_and_exports_its_whitening(demo_dir, tmp_path):
    canon, out = str(tmp_path / "canon"), str(tmp_path / "model")
    write_canonical(read_dataset(demo_dir), canon)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "t", "", {})
    cfg = resolve("tiny", ["train.max_steps=2", "train.batch_pairs=4", "model.fusion=concat",
                           "train.hard_negatives=one_modality", "train.whiten_notes=64"])
    run(canon, out, cfg, tracking_uri=uri, run_id=run_id, progress=False)
    params = mlflow.MlflowClient(uri).get_run(run_id).data.params
    assert params["train.in_batch_negatives"] == str(2 * 4 - 2 + 2 * 4)  # + 2 look-alikes/pair
    model = NoteLLM2.from_pretrained(out)
    stats = model.fusion.whitening()
    d = stats["text_white"].shape[0]
    assert os.path.exists(os.path.join(out, "whitening.safetensors"))
    assert not torch.allclose(stats["text_white"], torch.eye(d))  # fitted, not the identity
    assert float(stats["text_mean"].norm()) > 0


def test_the_train_task_metrics_for_the_kfp_ui():
    from components.train.run import kfp_metrics

    got = kfp_metrics({"loss": 1.23456789, "pairs_per_s": 200.0, "val/loss": float("nan"),
                       "exported_step": 15.0, "note": "x", "flag": True})
    assert got == {"loss": 1.234568, "pairs_per_s": 200.0, "exported_step": 15.0,
                   "steps": 15.0}
