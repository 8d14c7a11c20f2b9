"""The compiled pipeline is pinned by a golden structure file (tasks, wiring, parameters).

After an intended change: UPDATE_GOLDEN=1 pytest tests/pipelines/test_compile.py
"""

import json
import os

import pytest
import yaml
from click.testing import CliRunner
from kfp import components

from components.common.config import PRESETS, TUNED, ConfigError, merge_overrides
from pipelines import resources
from pipelines.cli import main

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "pipeline_structure.json")


def dag_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, in the root DAG and every sub-DAG (ExitHandler, ParallelFor,
    If), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def structure(spec: dict) -> dict:
    def io(d):
        return {kind: sorted(d.get(kind, {})) for kind in ("parameters", "artifacts") if d.get(kind)}

    root = spec["root"]
    return {
        "name": spec["pipelineInfo"]["name"],
        "parameters": {k: {"type": v["parameterType"], "default": v.get("defaultValue"),
                           "described": bool(v.get("description"))}
                       for k, v in root["inputDefinitions"]["parameters"].items()},
        "outputs": io(root.get("outputDefinitions", {})),
        "tasks": {k: {"component": v["componentRef"]["name"],
                      "after": sorted(v.get("dependentTasks", [])),
                      "inputs": io(v.get("inputs", {})),
                      "caching": v.get("cachingOptions", {}).get("enableCache", False),
                      "retries": v.get("retryPolicy", {}).get("maxRetryCount", 0)}
                  for k, v in dag_tasks(spec).items()},
        "components": {k: {"inputs": io(v.get("inputDefinitions", {})),
                           "outputs": io(v.get("outputDefinitions", {}))}
                       for k, v in spec["components"].items()},
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The pipeline as `notellm2 compile --kubernetes --image …` writes it for a cluster (what
    `submit` uploads): (IR, platform spec), compiled once for the tests below."""
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    result = CliRunner().invoke(main, ["compile", "--kubernetes", "--output", str(out),
                                       "--image", "registry.example/notellm2:1.2.3"])
    assert result.exit_code == 0, result.output
    spec, platform = yaml.safe_load_all(out.read_text())
    return out, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compile_matches_golden_and_loads(compiled):
    out, spec, _ = compiled
    got = structure(spec)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=2, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        assert got == json.load(f)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/notellm2:1.2.3"}
    assert all(p["described"] for p in got["parameters"].values())
    # kfp loads it back, as the UI and kfp.Client do
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "notellm2"
    assert "data_uri" in loaded.component_spec.inputs


def test_default_image_is_versioned_never_latest(tmp_path):
    from components.common.image import component_image

    image = component_image()
    assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1]


def test_kubernetes_settings_are_compiled_in_by_default(compiled):
    _, spec, execs = compiled
    train = execs["exec-train"]
    assert train["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm",
                                        "sizeLimit": "16Gi", "volumeName": "dshm"}]
    # inside the ExitHandler's sub-DAG the parameters arrive as pipeline channels
    assert train["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
        "node_selector")
    assert train["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith(
        "tolerations")
    for name, ex in execs.items():  # credentials come from optional Secrets, never inline
        assert all(s["optional"] for s in ex.get("secretAsEnv", []) + ex.get(
            "secretAsVolume", []) + ex.get("configMapAsEnv", [])), name
    # least privilege: MLflow credentials only where a task talks to MLflow
    assert not execs["exec-embed"].get("secretAsEnv") and execs["exec-embed"]["secretAsVolume"]
    for name in ("exec-shard-plan", "exec-settings", "exec-validate-gate"):  # config only
        assert not {"secretAsEnv", "secretAsVolume", "configMapAsEnv"} & set(execs[name]), name
    for name in ("exec-register", "exec-promote", "exec-train", "exec-ingest"):
        assert execs[name]["secretAsEnv"][0]["secretName"] == "notellm2-mlflow", name
    # GPU requests are IR: the train task's limit follows the train_gpus parameter
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" in res


def test_every_task_has_resources_timeout_and_pull_policy(compiled):
    _, spec, execs = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        for key in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert res.get(f"resource{key}"), (name, key)
        assert int(execs[name]["activeDeadlineSeconds"]) > 0, name
        # --image names a tag that may be reused: pull it every time
        assert execs[name]["imagePullPolicy"] == "Always", name
    # the model-sized tasks follow pipeline parameters, defaulting to the preset's sizes
    params = spec["root"]["inputDefinitions"]["parameters"]
    for task, param in (("train", "train_cpu"), ("train", "train_memory"),
                        ("embed", "embed_cpu"), ("embed", "embed_memory"),
                        ("evaluate", "embed_memory")):
        res = executors[f"exec-{task}"]["container"]["resources"]
        assert f"pipelinechannel--{param}" in json.dumps(res), (task, param)
    tiny = resources.SIZES["tiny"]
    assert params["train_memory"]["defaultValue"] == tiny["train"].memory
    assert params["embed_cpu"]["defaultValue"] == tiny["embed"].cpu
    assert execs["exec-train"]["activeDeadlineSeconds"] == str(tiny["train"].timeout_s)
    # every preset is sized
    assert set(resources.SIZES) == set(PRESETS)


def test_retries_where_an_attempt_can_resume(compiled):
    _, spec, _ = compiled
    tasks = dag_tasks(spec)
    retried = {k: v["retryPolicy"] for k, v in tasks.items() if "retryPolicy" in v}
    assert set(retried) == {"train", "embed", "merge-embeddings", "index", "evaluate",
                            "register", "promote", "finish-run"}
    # train resumes from its checkpoints (a run killed after a checkpoint
    # resumes to the same weights: tests/components/test_train_distributed.py)
    assert retried["train"] == {"maxRetryCount": 3, "backoffDuration": "120s",
                                "backoffFactor": 2.0, "backoffMaxDuration": "1800s"}
    # a deterministic refusal is not retried
    assert not {"settings", "ingest", "validate", "validate-gate"} & set(retried)


def test_embed_fan_out_is_bounded(compiled, tmp_path):
    _, spec, _ = compiled
    loops = {k: v["iteratorPolicy"] for k, v in dag_tasks(spec).items() if "iteratorPolicy" in v}
    assert loops == {"for-loop-2": {"parallelismLimit": 8}}
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(out), "--no-kubernetes",
                                       "--embed-parallelism", "3", "--preset",
                                       "qwen2-7b-clip-b16"])
    assert result.exit_code == 0, result.output
    (spec,) = yaml.safe_load_all(out.read_text())  # one document without the platform spec
    assert dag_tasks(spec)["for-loop-2"]["iteratorPolicy"] == {"parallelismLimit": 3}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "qwen2-7b-clip-b16"
    assert params["train_memory"]["defaultValue"] == \
        resources.SIZES["qwen2-7b-clip-b16"]["train"].memory
    assert "resources" in spec["deploymentSpec"]["executors"]["exec-train"]["container"]


def test_caching_only_on_pure_tasks(compiled):
    _, spec, _ = compiled
    tasks = {k: v for k, v in dag_tasks(spec).items() if "componentRef" in v
             and not v["componentRef"]["name"].startswith(("comp-exit-handler", "comp-for-loop",
                                                          "comp-condition"))}
    cached = {k for k, v in tasks.items() if v["cachingOptions"].get("enableCache")}
    assert cached == {"settings", "shard-plan", "embed"}
    # none of them takes the MLflow run: a cache hit skips no logging
    for name in cached:
        assert "mlflow_run_id" not in tasks[name].get("inputs", {}).get("parameters", {}), name
    for name, task in tasks.items():
        if "mlflow_run_id" in task.get("inputs", {}).get("parameters", {}):
            assert name not in cached, name


def test_default_image_tag_follows_the_source(monkeypatch):
    from components.common import image

    monkeypatch.delenv(image.ENV, raising=False)
    tag = image.component_image().rsplit(":", 1)[1]
    assert tag.endswith(f"-src.{image.source_hash()}") and len(image.source_hash()) == 12
    assert image.image_pull_policy() == "IfNotPresent"  # content-addressed: a node's copy is it
    image.source_hash.cache_clear()
    try:
        monkeypatch.setattr(image, "PACKAGES", ("components", "model"))  # other code, other tag
        assert image.component_image() != f"{image.REPOSITORY}:{tag}"
    finally:
        image.source_hash.cache_clear()


def test_failed_validation_reaches_the_ui_and_a_gate_stops_the_run(compiled):
    _, spec, _ = compiled
    comps, tasks = spec["components"], dag_tasks(spec)
    outs = comps["comp-validate"]["outputDefinitions"]
    assert {"verdict", "errors"} <= set(outs["parameters"])
    assert {"data_docs", "summary", "report", "validated"} <= set(outs["artifacts"])
    gate = tasks["validate-gate"]
    assert gate["inputs"]["parameters"]["verdict"]["taskOutputParameter"] == {
        "outputParameterKey": "verdict", "producerTask": "validate"}
    assert "validate-gate" in tasks["train"]["dependentTasks"]


def test_tuned_parameters_feed_the_settings_task(compiled):
    _, spec, execs = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["data_uri"]  # required
    assert {k: params[k]["parameterType"] for k in TUNED} == {
        "train_steps": "NUMBER_INTEGER", "learning_rate": "NUMBER_DOUBLE",
        "batch_pairs": "NUMBER_INTEGER", "model_variant": "STRING", "llm": "STRING",
        "vision": "STRING"}
    tasks = dag_tasks(spec)
    assert set(TUNED) <= set(tasks["settings"]["inputs"]["parameters"])
    for name, task in tasks.items():  # every task resolves its config from the merged list
        given = task.get("inputs", {}).get("parameters", {}).get("overrides")
        if given and name != "settings":
            assert given.get("taskOutputParameter", {}).get("producerTask") == "settings" or \
                given["componentInputParameter"] == "pipelinechannel--settings-Output", name
    # the tracking URI comes from the optional ConfigMap manifests/ creates
    env = execs["exec-ingest"]["configMapAsEnv"][0]
    assert env["configMapName"] == "notellm2-settings" and env["optional"]
    assert env["keyToEnv"] == [{"configMapKey": "MLFLOW_TRACKING_URI",
                                "envVar": "MLFLOW_TRACKING_URI"}]


def test_merge_overrides():
    assert merge_overrides("tiny", ["train.warmup_ratio=0.1"], train_steps=0, learning_rate=0.0,
                           llm="", batch_pairs=8) == ["train.warmup_ratio=0.1",
                                                      "train.batch_pairs=8"]
    assert merge_overrides("tiny", ["train.lr=0.001"], learning_rate=1e-3) == ["train.lr=0.001"]
    with pytest.raises(ConfigError, match="learning_rate=0.01 and the override train.lr=0.001"):
        merge_overrides("tiny", ["train.lr=0.001"], learning_rate=0.01)
    with pytest.raises(ConfigError, match="model.variant"):
        merge_overrides("tiny", [], model_variant="nope")


def test_a_known_kfp_ui_reaches_the_ingest_task(tmp_path, monkeypatch):
    """$KFP_UI_URL at compile time: the MLflow runs get a link to their KFP run."""
    from pipelines.compile import compile_pipeline

    monkeypatch.setenv("KFP_UI_URL", "https://kfp.example.com/pipeline")
    with open(compile_pipeline(str(tmp_path / "p.yaml"))) as f:
        spec = next(yaml.safe_load_all(f))
    envs = {name: {e["name"]: e["value"] for e in ex["container"].get("env", [])}
            for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert envs["exec-ingest"]["KFP_UI_URL"] == "https://kfp.example.com/pipeline"
    assert not any("KFP_UI_URL" in e for name, e in envs.items() if name != "exec-ingest")


def test_plain_compile_is_one_ir_document_without_placement_parameters(tmp_path):
    """`notellm2 compile` without --kubernetes: one KFP IR document (the outside contract:
    what the KFP UI uploads), and no node_selector/tolerations parameters, which would do
    nothing without the platform spec."""
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(out)])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text())  # a second document would raise here
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "root" in spec and "deploymentSpec" in spec
    assert not {"node_selector", "tolerations"} & set(params)
    assert "data_uri" in params and "train_steps" in params
