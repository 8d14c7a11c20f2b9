"""The compiled pipeline is pinned by a golden structure file (tasks, wiring, parameters).

After an intended change: UPDATE_GOLDEN=1 pytest tests/pipelines/test_compile.py
"""

import json
import os

import yaml
from click.testing import CliRunner
from kfp import components

from pipelines.cli import main

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "pipeline_structure.json")


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
                      "caching": v.get("cachingOptions", {}).get("enableCache", False)}
                  for k, v in root["dag"]["tasks"].items()},
        "components": {k: {"inputs": io(v.get("inputDefinitions", {})),
                           "outputs": io(v.get("outputDefinitions", {}))}
                       for k, v in spec["components"].items()},
    }


def test_compile_matches_golden_and_loads(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(out), "--image",
                                       "registry.example/notellm2:1.2.3"])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text())
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


def test_compile_with_kubernetes_settings(tmp_path):
    out = tmp_path / "k8s.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(out), "--kubernetes"])
    assert result.exit_code == 0, result.output
    spec, platform = yaml.safe_load_all(out.read_text())
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
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
            "secretAsVolume", [])), name
    # least privilege: MLflow credentials only where a task talks to MLflow
    assert not execs["exec-embed"].get("secretAsEnv") and execs["exec-embed"]["secretAsVolume"]
    assert "exec-shard-plan" not in execs  # no credentials, no placement: nothing at all
    for name in ("exec-register", "exec-promote", "exec-train", "exec-ingest"):
        assert execs[name]["secretAsEnv"][0]["secretName"] == "notellm2-mlflow", name
    # GPU requests are IR: the train task's limit follows the train_gpus parameter
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" in res


def test_a_known_kfp_ui_reaches_the_ingest_task(tmp_path, monkeypatch):
    """$KFP_UI_URL at compile time: the MLflow runs get a link to their KFP run."""
    from pipelines.compile import compile_pipeline

    monkeypatch.setenv("KFP_UI_URL", "https://kfp.example.com/pipeline")
    with open(compile_pipeline(str(tmp_path / "p.yaml"))) as f:
        spec = yaml.safe_load(f)
    envs = {name: {e["name"]: e["value"] for e in ex["container"].get("env", [])}
            for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert envs["exec-ingest"]["KFP_UI_URL"] == "https://kfp.example.com/pipeline"
    assert not any("KFP_UI_URL" in e for name, e in envs.items() if name != "exec-ingest")
