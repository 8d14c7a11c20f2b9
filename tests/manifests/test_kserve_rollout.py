"""`notellm2 rollout` and manifests/serving, offline: the InferenceService rendered from a SQLite
registry passes KServe's CRD schema (made strict, as the Trainer objects in test_manifests.py);
canary and promoted specs differ only in canaryTrafficPercent; the ServingRuntime and the
ServiceAccount are least privilege; the examples under manifests/serving/examples are what the
command renders (after an intended change: UPDATE_GOLDEN=1 pytest tests/manifests/test_kserve_rollout.py).
"""

from __future__ import annotations

import copy
import functools
import os
import tomllib

import pytest
import yaml
from click.testing import CliRunner
from test_manifests import CRDS, MANIFESTS, ROOT, _kubectl, _strict, name

from pipelines import rollout

EXAMPLES = MANIFESTS / "serving" / "examples"
DEST = "gs://CHANGE-ME-notellm2-mlflow/artifacts"  # ARTIFACTS_DESTINATION in manifests/base
ISVC = ("serving.kserve.io/v1beta1", "InferenceService")


def _source(version: int) -> str:
    return f"mlflow-artifacts:/1/models/m-{version:032x}/artifacts"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"


@pytest.fixture(scope="module")
def client(tracking_uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


_names = iter(range(10_000))


@pytest.fixture
def registry(client):
    """A fresh registered model in the shared store: make(versions, champion=, challenger=)."""
    model = f"notellm2-t{next(_names)}"

    def make(versions: int, *, champion=None, challenger=None, sources=None) -> str:
        client.create_registered_model(model)
        for v in range(1, versions + 1):
            client.create_model_version(model, (sources or {}).get(v, _source(v)))
        for alias, v in (("champion", champion), ("challenger", challenger)):
            if v:
                client.set_registered_model_alias(model, alias, str(v))
        return model

    return make


@functools.cache
def _isvc_schema() -> dict:
    """The InferenceService CRD's schema, strict like test_manifests' (only this 2 MB CRD, with
    libyaml when present: the pure-Python loader takes seconds)."""
    path = CRDS / "serving.kserve.io_inferenceservices.yaml"
    if not path.exists():
        pytest.skip(f"the KServe CRD is not in {CRDS} (see SOURCES.md there)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == ISVC[0].split("/")[1]]
    return _strict(version["schema"]["openAPIV3Schema"])


def _validate(obj: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    assert (obj["apiVersion"], obj["kind"]) == ISVC
    schema = _isvc_schema()
    return [f"{'.'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


# -- the plan from the registry ----------------------------------------------------------------

def test_canary_is_the_challenger_at_the_ab_share(client, registry):
    model = registry(2, champion=1, challenger=2)
    client.set_model_version_tag(model, "2", "decision", "hold")
    r = rollout.plan(client, model, 0.1, artifacts_destination=DEST)
    assert (r.stage, r.champion, r.challenger, r.percent) == ("canary", "1", "2", 10)
    assert r.storage_uri == f"{DEST}/1/models/m-{2:032x}/artifacts"
    assert r.champion_uri == f"{DEST}/1/models/m-{1:032x}/artifacts"
    assert "'hold'" in r.reasons[0]
    isvc = rollout.inference_service(r)
    assert _validate(isvc) == []
    pred = isvc["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 10
    assert pred["model"]["storageUri"] == r.challenger_uri
    assert pred["model"]["modelFormat"] == {"name": "mlflow"}
    assert pred["model"]["runtime"] == "notellm2-mlflow"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


def test_promoting_the_canary_only_drops_the_percent(client, registry):
    """After `notellm2 promote` both aliases name the canary's version: the same spec without
    canaryTrafficPercent, so KServe rolls the running canary revision out to 100 %."""
    model = registry(2, champion=1, challenger=2)
    canary = rollout.inference_service(rollout.plan(client, model, 0.1,
                                                    artifacts_destination=DEST))
    client.set_registered_model_alias(model, "champion", "2")
    r = rollout.plan(client, model, 0.1, artifacts_destination=DEST)
    assert (r.stage, r.champion, r.percent) == ("champion", "2", None)
    promoted = rollout.inference_service(r)
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    expected = copy.deepcopy(canary)
    del expected["spec"]["predictor"]["canaryTrafficPercent"]
    assert promoted == expected
    assert _validate(promoted) == []


def test_a_rolled_back_challenger_gets_no_canary(client, registry):
    # what `notellm2 rollback` leaves after promoting 2 (components/register/promote.py)
    model = registry(2, champion=1, challenger=2)
    client.set_model_version_tag(model, "2", "rolled_back", "2026-01-01T00:00:00Z")
    r = rollout.plan(client, model, 0.1, artifacts_destination=DEST)
    assert (r.stage, r.champion) == ("champion", "1")
    assert "rolled back" in r.reasons[0]
    with pytest.raises(rollout.RolloutError, match="rolled back"):
        rollout.plan(client, model, 0.1, stage="canary", artifacts_destination=DEST)


def test_stages_and_shares(client, registry):
    model = registry(2, champion=1, challenger=2)
    r = rollout.plan(client, model, 0.1, stage="champion", artifacts_destination=DEST)
    assert (r.stage, r.storage_uri) == ("champion", r.champion_uri)
    assert rollout.plan(client, model, 0.0, artifacts_destination=DEST).stage == "champion"
    assert rollout.plan(client, model, 0.25, artifacts_destination=DEST).percent == 25
    with pytest.raises(rollout.RolloutError, match="no canary"):
        rollout.plan(client, model, 0.0, stage="canary", artifacts_destination=DEST)
    with pytest.raises(rollout.RolloutError, match="promote version 2"):
        rollout.plan(client, model, 1.0, artifacts_destination=DEST)
    assert rollout.plan(client, model, 1.0, stage="champion",
                        artifacts_destination=DEST).stage == "champion"
    with pytest.raises(rollout.RolloutError, match="whole percents"):
        rollout.plan(client, model, 0.125, artifacts_destination=DEST)
    with pytest.raises(rollout.RolloutError, match="between 0 and 1"):
        rollout.canary_percent(1.5)


def test_no_champion_no_manifest(client, registry):
    """KServe gives a first revision all traffic whatever the percent: never a 'canary' of a
    challenger with nothing rolled out before it."""
    model = registry(1, challenger=1)
    with pytest.raises(rollout.RolloutError, match="no 'champion'"):
        rollout.plan(client, model, 0.1, artifacts_destination=DEST)


@pytest.mark.parametrize(("source", "dest", "expected"), [
    ("mlflow-artifacts:/3/models/m-1/artifacts", "gs://b/root/", "gs://b/root/3/models/m-1/artifacts"),
    ("mlflow-artifacts://mlflow:5000/3/m/artifacts", "gs://b/root", "gs://b/root/3/m/artifacts"),
    ("gs://b/3/models/m-1/artifacts", "", "gs://b/3/models/m-1/artifacts"),
    ("s3://b/x", "", "s3://b/x"),
    ("mlflow-artifacts:/3/m", "", "--artifacts-destination"),
    ("file:///tmp/mlartifacts/3/m", "", "cannot pull"),
    ("mlflow-artifacts:/3/m", "/mlartifacts", "cannot pull"),  # the dev overlay's PVC
])
def test_storage_uri(source, dest, expected):
    if "://" in expected:
        assert rollout.storage_uri(source, dest) == expected
    else:
        with pytest.raises(rollout.RolloutError, match=expected):
            rollout.storage_uri(source, dest)


# -- least privilege ---------------------------------------------------------------------------

def test_predictor_is_least_privilege(client, registry):
    model = registry(2, champion=1, challenger=2)
    isvc = rollout.inference_service(rollout.plan(client, model, 0.1,
                                                  artifacts_destination=DEST), gpus=1)
    pred = isvc["spec"]["predictor"]
    assert pred["serviceAccountName"] == "notellm2-serving"
    assert pred["automountServiceAccountToken"] is False
    psc, sc = pred["securityContext"], pred["model"]["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                  "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {"name": "NOTELLM2_SERVING_IMAGE_PREFIXES", "value": ""} in pred["model"]["env"]
    res = pred["model"]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1" and res["requests"]["memory"]
    mounts = {m["mountPath"] for m in pred["model"]["volumeMounts"]}
    assert mounts == {"/tmp", "/home/notellm2"}  # the image's HOME; the root stays read-only
    assert _validate(isvc) == []


def _serving() -> list[dict]:
    import subprocess

    out = subprocess.run([_kubectl(), "kustomize", str(MANIFESTS / "serving")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_serving_kustomization():
    """ServiceAccount (no token, read-only bucket identity) and ServingRuntime, whose container
    passes the Kubernetes Container schema (inside a Pod) and runs the versioned project image."""
    from components.common import image

    objs = {o["kind"]: o for o in _serving()}
    assert set(objs) == {"ServiceAccount", "ServingRuntime"}
    sa, rt = objs["ServiceAccount"], objs["ServingRuntime"]
    assert sa["metadata"]["name"] == rollout.SERVICE_ACCOUNT
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["namespace"] == rt["metadata"]["namespace"] == rollout.NAMESPACE
    assert rt["metadata"]["name"] == rollout.RUNTIME
    assert rt["spec"]["supportedModelFormats"] == [{"name": "mlflow", "autoSelect": False}]
    (c,) = rt["spec"]["containers"]
    assert c["name"] == "kserve-container"
    assert c["command"] == ["mlflow", "models", "serve"] and "/mnt/models" in c["args"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert c["image"] == f"{image.REPOSITORY}:{version}", "the model requires this version"
    assert {"name": "NOTELLM2_SERVING_IMAGE_PREFIXES", "value": ""} in c["env"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] != 0
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from test_manifests import K8S_VERSION

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
           "spec": {"containers": [c]}}
    for o in (sa, pod):
        kv.validate(o, K8S_VERSION, strict=True)


# -- the command and the committed examples ----------------------------------------------------

def _example_registry(client) -> str:
    """Champion version 1, challenger version 2 (held by the offline gate)."""
    model = "notellm2"
    client.create_registered_model(model)
    for v in (1, 2):
        client.create_model_version(model, _source(v))
    client.set_model_version_tag(model, "2", "decision", "hold")
    client.set_registered_model_alias(model, "champion", "1")
    client.set_registered_model_alias(model, "challenger", "2")
    return model


def test_cli_renders_the_examples(client, tracking_uri, tmp_path):
    from pipelines.cli import main

    _example_registry(client)
    runner = CliRunner()
    for stage, argv in (("canary", []), ("champion", ["--stage", "champion"])):
        out = tmp_path / f"{stage}.yaml"
        res = runner.invoke(main, ["rollout", "--tracking-uri", tracking_uri,
                                   "--artifacts-destination", DEST, "-o", str(out), *argv])
        assert res.exit_code == 0, res.output
        text = out.read_text()
        (isvc,) = [d for d in yaml.safe_load_all(text) if d]
        assert (isvc["apiVersion"], isvc["kind"]) == ISVC and _validate(isvc) == [], name(isvc)
        assert ("canaryTrafficPercent" in isvc["spec"]["predictor"]) == (stage == "canary")
        golden = EXAMPLES / f"inferenceservice-{stage}.yaml"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(text)
        assert golden.read_text() == text, f"{golden} is stale: UPDATE_GOLDEN=1"
    # stdout, a share from --set, and a refusal that says why
    res = runner.invoke(main, ["rollout", "--tracking-uri", tracking_uri, "--artifacts-destination",
                               DEST, "--set", "register.ab_traffic_challenger=0.05"])
    assert res.exit_code == 0 and "canaryTrafficPercent: 5\n" in res.output
    res = runner.invoke(main, ["rollout", "--tracking-uri", tracking_uri])
    assert res.exit_code == 1 and "--artifacts-destination" in res.output
