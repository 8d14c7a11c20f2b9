"""DeepSpeed training on two gloo processes (torchrun), checkpoints, resume, export, failures.

The runs are short (6 steps of the tiny model, one thread per process) and deterministic: the
same config gives the same numbers on every run, which is what the resume test relies on.
"""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch

from components.common.config import resolve
from components.common.notes import LazyNotes
from components.common.readers import read_dataset, write_canonical
from components.common.tracking import create_run, step_runs
from components.train.checkpoint import MARKER, CheckpointStore, step_name
from components.train.data import PairBatches, PairOrder, TrainData, make_collate, val_batches
from components.train.ds_config import deepspeed_config
from components.train.run import NonFiniteLoss, run
from components.train.worker import STEP_DELAY_ENV
from model import NoteLLM2
from model.collator import NoteCollator
from model.loss import notellm2_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 32 training pairs in the demo data: 8 pairs x 2 processes = 2 steps an epoch
# the process mechanics on in-batch negatives only: look-alikes across ranks are tested at the
# loss (tests/model/test_loss_distributed.py) and through run-local on two ZeRO-3 processes
BASE = ["train.max_steps=6", "train.batch_pairs=8", "train.log_every=1", "train.val_every=3",
        "train.checkpoint_every=3", "train.nproc=2", "train.threads_per_proc=1",
        "train.warmup_ratio=0", "train.hard_negatives=none"]


@pytest.fixture(scope="module")
def canon(demo_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("canon"))
    write_canonical(read_dataset(demo_dir), out)
    return out


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating a SQLite store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """A metric's history in the train step's run under the pipeline run ``run_id``."""
    train = step_runs(uri, run_id)["train"].info.run_id
    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(train, key)}


def _weights(path: str) -> dict[str, torch.Tensor]:
    return NoteLLM2.from_pretrained(path).state_dict()


# -- multi-process runs ------------------------------------------------------------------------


def test_zero2_on_two_processes_lowers_the_loss_and_checkpoints(canon, store_uri, tmp_path):
    out = str(tmp_path / "model")
    run_id = create_run(store_uri, "dist", "", {})
    # 16 pairs x 2 processes = every training pair in each step: the same batch every step
    final = run(canon, out, resolve("tiny", [*BASE, "train.batch_pairs=16"]),
                tracking_uri=store_uri, run_id=run_id, progress=False)
    losses = _history(store_uri, run_id, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < 0.85 * losses[1]
    assert {"pairs_per_s", "tokens_per_s", "lr", "scale", "peak_rss_mib", "val/loss"} <= set(final)
    assert _history(store_uri, run_id, "train/lr")[6] == pytest.approx(0.0, abs=1e-12)

    store = CheckpointStore(str(tmp_path / "checkpoints"))
    assert store.complete_steps() == [3, 6]
    ckpt = tmp_path / "checkpoints" / step_name(6)
    files = set(os.listdir(ckpt / "ds")) | set(os.listdir(ckpt))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng-rank-00000.json", "rng-rank-00001.json", "trainer_state.json", MARKER} <= files
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["fingerprint"]["world_size"] == 2
    ds = json.loads((tmp_path / "model" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 32
    train = step_runs(store_uri, run_id)["train"].info.run_id
    artifacts = {a.path for a in mlflow.MlflowClient(store_uri).list_artifacts(train, "training")}
    assert {"training/ds_config.json", "training/loss_curve.png"} <= artifacts


def test_zero3_export_equals_the_sharded_weights_and_the_in_memory_model(canon, store_uri,
                                                                          tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = str(tmp_path / "model")
    run_id = create_run(store_uri, "dist", "", {})
    cfg = resolve("tiny", [*BASE, "train.zero_stage=3", "train.batch_pairs=4",
                           "train.grad_accum=2", "model.gradient_checkpointing=true",
                           "train.checkpoint_every=0"])
    run(canon, out, cfg, tracking_uri=store_uri, run_id=run_id, progress=False)
    exported = _weights(out)

    # DeepSpeed's own consolidation of the two ranks' shards of the final checkpoint
    shards = get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / "checkpoints" / step_name(6)), tag="ds")
    shards = {k.removeprefix("model."): v for k, v in shards.items()}
    assert set(shards) == set(exported)
    for k, v in exported.items():
        torch.testing.assert_close(v, shards[k].reshape(v.shape), rtol=0, atol=0)

    # the in-memory ZeRO-3 model scored the held-out pairs at the last step: the exported model
    # encodes them to the same loss
    data = TrainData.load(canon)
    model = NoteLLM2.from_pretrained(out)
    # the export's channel whitening was fitted after training: the model that scored the
    # held-out pairs had none
    model.fusion.reset_whitening()
    collate = make_collate(LazyNotes(data.notes), NoteCollator(model), None)
    pairs = PairBatches(data.val, data.row_of)
    total = 0.0
    batches = val_batches(len(pairs), 4)
    with torch.no_grad():
        for idx in batches:
            batch = collate([pairs[j] for j in idx])
            keys = batch.pop("keys")
            total += float(notellm2_loss(model(**batch), model.log_scale, 9.0, 1.0, keys=keys,
                                         gather=False)["loss"])
    logged = _history(store_uri, run_id, "val/loss")[6]
    assert total / len(batches) == pytest.approx(logged, abs=1e-5)


def _start_killable(canon: str, out: str, overrides: list[str], uri: str, run_id: str,
                    log_path: str) -> subprocess.Popen:
    code = ("from components.common.config import resolve\n"
            "from components.train.run import run\n"
            f"run({canon!r}, {out!r}, resolve('tiny', {overrides!r}), tracking_uri={uri!r}, "
            f"run_id={run_id!r}, progress=False)\n")
    # steps slowed to 0.5 s: after the step-3 checkpoint the kill has > 1 s to land before step 6
    env = dict(os.environ, PYTHONPATH=ROOT, **{STEP_DELAY_ENV: "0.5"})
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow  # three runs of two processes: ~30 s
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(canon, store_uri,
                                                                     tmp_path):
    cfg = resolve("tiny", BASE)
    a_out, b_out = str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")
    a_id = create_run(store_uri, "dist", "a", {})
    run(canon, a_out, cfg, tracking_uri=store_uri, run_id=a_id, progress=False)

    # B: SIGKILL the whole process tree once step 3's checkpoint is complete
    b1_id = create_run(store_uri, "dist", "b1", {})
    proc = _start_killable(canon, b_out, BASE, store_uri, b1_id, str(tmp_path / "b1.log"))
    marker = tmp_path / "b" / "checkpoints" / step_name(3) / MARKER
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("run B ended before its first checkpoint:\n"
                        + (tmp_path / "b1.log").read_text()[-3000:])
        time.sleep(0.05)
    time.sleep(0.3)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, "training processes outlived their launcher"
    store = CheckpointStore(str(tmp_path / "b" / "checkpoints"))
    assert store.latest() == 3 and not os.path.exists(b_out)
    # what a kill during a save leaves behind: a staging folder and an unmarked step folder
    for partial in (".tmp-" + step_name(5), step_name(4)):
        os.makedirs(tmp_path / "b" / "checkpoints" / partial / "ds")
        (tmp_path / "b" / "checkpoints" / partial / "ds" / "junk.pt").write_bytes(b"\0")

    b2_id = create_run(store_uri, "dist", "b2", {})
    run(canon, b_out, cfg, tracking_uri=store_uri, run_id=b2_id, progress=False)

    a, b = _weights(a_out), _weights(b_out)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6
    # B's second attempt trained steps 4-6 only, on A's learning-rate schedule
    a_lr, b_lr = (_history(store_uri, i, "train/lr") for i in (a_id, b2_id))
    assert sorted(b_lr) == [4, 5, 6]
    assert all(b_lr[s] == pytest.approx(a_lr[s], rel=1e-12) for s in b_lr)
    assert _history(store_uri, b2_id, "train/loss") == pytest.approx(
        {s: v for s, v in _history(store_uri, a_id, "train/loss").items() if s > 3}, abs=1e-6)
    assert store.complete_steps() == [3, 6]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == [step_name(3), step_name(6)]


def test_a_nonfinite_loss_stops_every_rank_with_a_diagnostic(canon, store_uri, tmp_path):
    out = str(tmp_path / "model")
    # an absurd learning rate: step 1's loss is finite, its update overflows the weights
    cfg = resolve("tiny", [*BASE, "train.lr=1e30", "train.checkpoint_every=1"])
    with pytest.raises(NonFiniteLoss, match=r"step 2 .*2 of 2 processes|2 of 2 processes.*step 2"):
        run(canon, out, cfg, tracking_uri=store_uri, run_id=create_run(store_uri, "dist", "", {}),
            progress=False)
    root = tmp_path / "checkpoints"
    diag = json.loads((root / f"nonfinite-{step_name(2)}.json").read_text())
    assert diag["step"] == 2 and [r["rank"] for r in diag["ranks"]] == [0, 1]
    assert all(len(r["note_ids"]) == 16 and r["loss"]["loss"] == "nan" for r in diag["ranks"])
    assert diag["last_complete_checkpoint"].endswith(step_name(1))
    assert CheckpointStore(str(root)).complete_steps() == [1]
    assert not os.path.exists(out)


# -- the parts, without processes -------------------------------------------------------------


def test_resume_ignores_checkpoints_cut_mid_write_and_prunes(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        tmp = store.prepare(step)
        (tmp_path / os.path.basename(tmp) / "weights").write_text("w")
        if step < 4:
            store.publish(step, {})
    os.remove(tmp_path / step_name(3) / MARKER)  # renamed, marker never written
    store.prepare(5)  # a staging folder from a killed save
    assert store.complete_steps() == [1, 2] and store.latest() == 2
    store.prune()
    assert sorted(os.listdir(tmp_path)) == [step_name(1), step_name(2)]
    os.makedirs(tmp_path / step_name(4) / "old")  # an unmarked folder of the step being saved
    (tmp_path / os.path.basename(store.prepare(4)) / "weights").write_text("new")
    store.publish(4, {})
    store.prune()
    assert store.complete_steps() == [2, 4]
    assert sorted(os.listdir(tmp_path / step_name(4))) == [MARKER, "weights"]


def test_pair_order_is_deterministic_disjoint_and_resumable():
    ranks = [PairOrder(50, 4, world=2, rank=r, seed=7, multiple=2) for r in (0, 1)]
    assert ranks[0].per_epoch == 6  # 50 // 8 = 6 micro-batches, a multiple of 2
    epoch0 = [list(o) for o in ranks]
    flat = [i for batches in epoch0 for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 48
    again = PairOrder(50, 4, world=2, rank=0, seed=7, multiple=2)
    assert list(again) == epoch0[0]
    again.set_epoch(0, start=4)
    assert list(again) == epoch0[0][4:]
    again.set_epoch(1)
    assert list(again) != epoch0[0]
    with pytest.raises(ValueError, match="fill no step"):
        PairOrder(7, 4, world=2)


def test_deepspeed_config_follows_the_train_config():
    t = resolve("tiny", ["train.zero_stage=3", "train.offload=true", "train.grad_accum=4",
                         "train.grad_clip=0.5"]).train
    ds = deepspeed_config(t, micro_batch=8, world=2, device="cpu")
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError, match="needs a GPU"):
        deepspeed_config(resolve("tiny", ["train.precision=bf16"]).train, micro_batch=1,
                         world=1, device="cpu")


def test_zero3_buffers_follow_the_model_width():
    """DeepSpeed's absolute defaults (1e9 parameters kept gathered) would keep a small model
    whole on every rank; the buffers scale with the LLM's width instead, and on CPU a gathered
    parameter lives about one decoder layer."""
    t = resolve("tiny", ["train.zero_stage=3"]).train
    cpu = deepspeed_config(t, micro_batch=2, world=2, device="cpu", hidden=768)["zero_optimization"]
    assert cpu["reduce_bucket_size"] == 768 ** 2
    assert cpu["stage3_max_reuse_distance"] == cpu["stage3_max_live_parameters"] == 12 * 768 ** 2
    gpu = deepspeed_config(t, micro_batch=2, world=2, device="cuda", hidden=4096)
    assert gpu["zero_optimization"]["stage3_param_persistence_threshold"] == 40_960
    assert "stage3_max_reuse_distance" not in gpu["zero_optimization"]  # DeepSpeed's own
    two = deepspeed_config(resolve("tiny", ["train.zero_stage=2"]).train, micro_batch=2,
                           world=2, device="cpu", hidden=768)["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in two


# -- ZeRO-3 builds the model partitioned --------------------------------------------------------


def _zero3_build_worker(rank: int, init_file: str, out_dir: str, llm: str, vision: str) -> None:
    import torch.distributed as dist

    from components.train.worker import _import_deepspeed, build_for_training, parameter_count
    from model.prompts import IMG, IMG_EMB

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2")  # what torchrun sets and DeepSpeed reads
    ds = _import_deepspeed(on_gpu=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = resolve("tiny", [f"model.llm={llm}", f"model.vision={vision}", "train.zero_stage=3",
                           "model.train_vision=false"])
    ds_config = deepspeed_config(cfg.train, micro_batch=2, world=2, device="cpu")
    model = build_for_training(cfg, [], ds, ds_config, torch.float32)
    # what this rank holds right after construction, before the engine exists
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
               for p in model.parameters())
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id")]
    gathered = {}
    for name, p in model.named_parameters():
        if name.startswith(("llm.", "vision.")) or name == "log_scale":
            with ds.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                gathered[name] = p.detach().clone()
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in (IMG, IMG_EMB)]
    torch.save({"held": held, "total": parameter_count(model), "partitioned": partitioned,
                "names": [n for n, _ in model.named_parameters()], "weights": gathered,
                "placeholder_ids": ids, "tokens": len(model.tokenizer)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_builds_the_model_partitioned_from_a_checkpoint(tmp_path):
    """Each rank holds half the parameters from the moment they exist (not the whole model,
    then a broadcast), the weights are the checkpoint's, and the placeholder rows its mean."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tests import checkpoints as ck

    llm = ck.llama_checkpoint(str(tmp_path / "llama"))
    vision = ck.clip_checkpoint(str(tmp_path / "clip"))
    mp.spawn(_zero3_build_worker, args=(str(tmp_path / "init"), str(tmp_path), llm, vision),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    total = ranks[0]["total"]
    assert total > 100_000
    for r in ranks:
        assert r["held"] <= 0.55 * total  # half, plus padding and the temperature
        assert set(r["partitioned"]) == set(r["names"]) - {"log_scale"}
    want = {"llm." + k.removeprefix("model."): v.float()
            for k, v in load_file(os.path.join(llm, "model.safetensors")).items()
            if k.startswith("model.")}
    want |= {k.replace("vision_model.", "vision.", 1): v
             for k, v in load_file(os.path.join(vision, "model.safetensors")).items()
             if k.startswith("vision_model.")}
    got = ranks[0]["weights"]
    emb = "llm.embed_tokens.weight"
    trained = want[emb].shape[0]
    for name, w in want.items():
        g = got[name][:trained] if name == emb else got[name]
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    mean = want[emb].mean(dim=0)
    for i in ranks[0]["placeholder_ids"]:
        assert i >= trained
        torch.testing.assert_close(got[emb][i], mean, rtol=0, atol=1e-6)
    for name in got:  # both ranks gathered the same model
        torch.testing.assert_close(ranks[1]["weights"][name], got[name], rtol=0, atol=0)
