"""``run-local --set model.llm=DIR --set model.vision=DIR`` on checkpoint folders shaped like the
ones users bring (``tests/checkpoints.py``: real configs and file formats, random weights), on
CPU, through the CLI as a user types it. No network."""

import json
import os

import mlflow
import pytest
import torch
from click.testing import CliRunner

from model import NoteLLM2
from pipelines.cli import main
from tests import checkpoints as ck

pytestmark = pytest.mark.slow
SHORT = ("train.max_steps=3", "train.batch_pairs=4", "train.val_every=1", "embed.batch_size=32",
         "eval.saliency_pairs=4")


@pytest.fixture(autouse=True)
def own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _run_local(data: str, work: str, overrides: list[str]) -> None:
    args = ["run-local", "--data", data, "--work", work]
    for o in [*SHORT, *overrides]:
        args += ["--set", o]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output[-4000:]


def _registered(work: str):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    version = client.get_model_version_by_alias("notellm2", "challenger")
    return client, version


def test_a_bf16_llama_with_a_siglip_384_tower_trains_evaluates_and_registers(demo_dir, tmp_path):
    llm = ck.llama_checkpoint(str(tmp_path / "llama-bf16"))  # BOS-adding tokenizer, no pad
    vision = ck.siglip_checkpoint(str(tmp_path / "siglip-384"))
    work = str(tmp_path / "work")
    _run_local(demo_dir, work, [f"model.llm={llm}", f"model.vision={vision}"])
    with open(os.path.join(work, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["status"] == "complete" and metrics["n_queries"] > 0
    assert 0.0 < metrics["saliency/image_share"] < 1.0  # the diagnostic ran on the model
    client, version = _registered(work)
    run = client.get_run(version.run_id)
    assert run.data.params["model.llm"] == llm
    model = NoteLLM2.from_pretrained(os.path.join(work, "model"))
    assert model.pixel_shape == (3, 384, 384)
    assert model.prompts.prefix == [model.tokenizer.bos_token_id]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_qwen2_with_spare_rows_and_a_clip_tower_on_two_zero3_processes(demo_dir, tmp_path):
    """The reference recipe's options on two CPU processes under ZeRO-3 (model built
    partitioned): linear decay, flips, and the export of the best validation step."""
    llm = ck.qwen2_checkpoint(str(tmp_path / "qwen2-bf16"))
    vision = ck.clip_checkpoint(str(tmp_path / "clip-b32"))  # the whole CLIPModel
    work = str(tmp_path / "work")
    _run_local(demo_dir, work, [f"model.llm={llm}", f"model.vision={vision}", "train.nproc=2",
                                "train.zero_stage=3", "train.threads_per_proc=1",
                                "train.export=best", "train.hflip=0.5",
                                "train.lr_schedule=linear"])
    client, version = _registered(work)
    run = client.get_run(version.run_id)
    # every rank's notes and both look-alikes of every rank's pairs
    assert run.data.params["train.in_batch_negatives"] == str(2 * 4 * 2 - 2 + 2 * 4 * 2)
    assert run.data.params["train.global_batch_pairs"] == "8"
    train = [r for r in client.search_runs([run.info.experiment_id])
             if r.data.tags.get("kfp_step") == "train"][0]
    best = min(client.get_metric_history(train.info.run_id, "val/loss"), key=lambda m: m.value)
    assert train.data.metrics["train/exported_step"] == best.step
    with open(os.path.join(work, "model", "ds_config.json")) as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["stage"] == 3
    model = NoteLLM2.from_pretrained(os.path.join(work, "model"))
    assert model.pixel_shape == (3, 224, 224) and model.cls_from_token
