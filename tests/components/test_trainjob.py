"""train.launcher=trainjob: the TrainJob against the Kubeflow Trainer API models and the TrainJob
CRD's schema, and the submit/watch loop against a fake Kubernetes API server on loopback."""

from __future__ import annotations

import copy
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components.common import storage
from components.common.config import resolve
from components.train import lease
from components.train import trainjob as tj

kubernetes = pytest.importorskip("kubernetes")
models = pytest.importorskip("kubeflow_trainer_api.models")

CRDS = Path(__file__).resolve().parents[3] / "shared" / "data" / "k8s-crds"
TRAINJOB_CRD = CRDS / "trainer.kubeflow.org_trainjobs.yaml"
IMAGE = "registry.example/notellm2-kfp:0.1.0"


def _cfg(*overrides: str):
    return resolve("tiny", ["train.launcher=trainjob", *overrides])


def _job(cfg=None, name="notellm2-train-0a1b2c3d", **kw):
    return tj.build_trainjob(name, cfg or _cfg("train.num_nodes=2", "train.gpus_per_node=4",
                                               "train.cpu_per_node=8",
                                               "train.memory_per_node=64Gi"),
                             "gs://bkt/run/validate/canonical", "gs://bkt/run/train/model",
                             tracking_uri="http://mlflow.mlflow:5000", run_id="0f" * 16,
                             image=IMAGE, **kw)


# -- the object ---------------------------------------------------------------------------------

def test_trainjob_round_trips_through_the_trainer_api_models():
    job = _job(owner={"api_version": "v1", "kind": "Pod", "name": "train-pod", "uid": "u-1"})
    body = job.to_dict()
    assert models.TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    # what the Kubernetes client sends is this dict, unchanged, and it is plain JSON
    sent = kubernetes.client.ApiClient().sanitize_for_serialization(body)
    assert sent == body and json.loads(json.dumps(sent)) == body

    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "train-pod", "uid": "u-1"}]
    assert body["metadata"]["labels"]["notellm2.io/mlflow-run-id"] == "0f" * 16
    spec = body["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime", "name": "notellm2-deepspeed"}
    assert spec["activeDeadlineSeconds"] == 86_400
    tr = spec["trainer"]
    assert (tr["image"], tr["numNodes"], tr["numProcPerNode"]) == (IMAGE, 2, 4)
    assert tr["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "8",
                                                "memory": "64Gi"}
    assert tr["resourcesPerNode"]["requests"] == tr["resourcesPerNode"]["limits"]
    env = {e["name"]: e for e in tr["env"]}
    assert "DS_ACCELERATOR" not in env  # GPUs
    # credentials by reference, never inline
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "notellm2-mlflow", "key": "MLFLOW_TRACKING_PASSWORD",
                         "optional": True}}}


def test_command_is_torchrun_sized_by_the_runtime_and_rebuilds_the_config():
    cfg = _cfg("train.gpus_per_node=2", "train.lr=0.00123", "train.offload=true",
               "eval.ks=[1,5]", "model.max_tokens=80")
    cmd = _job(cfg).spec.trainer.command
    # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-* from the PET_* variables
    # that the torch runtime injects: no size flags of our own
    assert cmd[:3] == ["torchrun", "-m", "components.train.trainjob"]
    assert not [a for a in cmd if a.startswith(("--nnodes", "--nproc", "--node", "--master"))]
    flags: dict[str, list[str]] = {}
    for key, value in zip(cmd[3::2], cmd[4::2], strict=True):
        flags.setdefault(key, []).append(value)
    assert flags["--canonical"] == ["gs://bkt/run/validate/canonical"]
    assert flags["--model-out"] == ["gs://bkt/run/train/model"]
    assert flags["--result-uri"] == ["gs://bkt/run/train/trainjob/notellm2-train-0a1b2c3d"]
    assert flags["--tracking-uri"] == ["http://mlflow.mlflow:5000"]
    # the pods train exactly this configuration; only the checkpoints are pinned to gs://
    pods = resolve(flags["--preset"][0], flags["--set"])
    assert pods.train.checkpoint_dir == "gs://bkt/run/train/checkpoints"
    assert pods == resolve("tiny", ["train.launcher=trainjob", "train.gpus_per_node=2",
                                    "train.lr=0.00123", "train.offload=true", "eval.ks=[1,5]",
                                    "model.max_tokens=80",
                                    "train.checkpoint_dir=gs://bkt/run/train/checkpoints"])


def test_cpu_trainjob_runs_nproc_processes_on_deepspeeds_cpu_accelerator():
    tr = _job(_cfg("train.nproc=3")).spec.trainer
    assert tr.num_proc_per_node == 3 and tr.num_nodes == 1
    # resourcesPerNode replaces the runtime's resources: no GPU (its default asks for one)
    assert tr.to_dict()["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "0"},
                                                "requests": {"nvidia.com/gpu": "0"}}
    assert {e.name: e.value for e in tr.env}["DS_ACCELERATOR"] == "cpu"
    with pytest.raises(ValueError, match="one process per GPU"):
        _job(_cfg("train.gpus_per_node=2", "train.nproc=4"))
    with pytest.raises(ValueError, match="is not the configuration"):
        _job(overrides=["train.lr=1.0"])
    with pytest.raises(ValueError, match="gs://"):
        tj.build_trainjob("x", _cfg(), "/tmp/canonical", "gs://b/m", image=IMAGE)


def _structural(schema: dict) -> dict:
    """The CRD schema with every object closed to fields it does not list: the API server
    silently prunes unknown fields, so here they are errors."""
    schema = copy.deepcopy(schema)

    def close(s):
        if isinstance(s, dict):
            if (s.get("type") == "object" and "properties" in s
                    and "additionalProperties" not in s
                    and not s.get("x-kubernetes-preserve-unknown-fields")):
                s["additionalProperties"] = False
            for v in s.values():
                close(v)
        elif isinstance(s, list):
            for v in s:
                close(v)

    close(schema)
    return schema


def test_trainjob_validates_against_the_trainjob_crd_schema():
    if not TRAINJOB_CRD.is_file():
        pytest.skip(f"TrainJob CRD not found at {TRAINJOB_CRD}")
    jsonschema = pytest.importorskip("jsonschema")
    yaml = pytest.importorskip("yaml")
    with open(TRAINJOB_CRD) as f:
        crd = next(d for d in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                   if d)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    validator = jsonschema.Draft7Validator(_structural(version["schema"]["openAPIV3Schema"]))
    for job in (_job(owner={"api_version": "v1", "kind": "Pod", "name": "p", "uid": "u"}),
                _job(_cfg())):
        body = job.to_dict()
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(body)]
        assert not errors, errors
        # the CEL rules that apply to what we set (not evaluated by jsonschema)
        assert body["spec"]["trainer"]["numProcPerNode"] >= 1
        assert body["spec"]["trainer"]["numNodes"] >= 1
    # and the check has teeth: a misspelt field, a malformed quantity
    bad = _job().to_dict()
    bad["spec"]["trainer"]["numProcsPerNode"] = 2
    bad["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"] = "64 GB"
    assert len(list(validator.iter_errors(bad))) == 2


# -- paths --------------------------------------------------------------------------------------

def test_kfp_gcs_paths_become_gs_uris():
    assert tj.to_gcs_uri("/gcs/bkt/pipeline/run/train/model") == "gs://bkt/pipeline/run/train/model"
    assert tj.to_gcs_uri("gs://bkt/x") == "gs://bkt/x"


@pytest.mark.parametrize("path", ["/tmp/kfp_outputs/train/model", "/minio/mlpipeline/x", "/gcs/"])
def test_local_paths_are_a_clear_error(path):
    with pytest.raises(ValueError, match="gs:// pipeline root"):
        tj.to_gcs_uri(path)


def test_config_rejects_unknown_launchers():
    with pytest.raises(ValueError, match="local or trainjob"):
        resolve("tiny", ["train.launcher=slurm"])
    with pytest.raises(ValueError, match="num_nodes"):
        resolve("tiny", ["train.num_nodes=0"])


# -- a fake Kubernetes API server ---------------------------------------------------------------

def _status(*conditions, jobs=()):
    return {"status": {
        "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, r, m in conditions],
        "jobsStatus": [{"name": "node", "active": a, "ready": rd, "succeeded": s, "failed": f,
                        "suspended": 0} for a, rd, s, f in jobs]}}


CREATED = _status(jobs=[(2, 0, 0, 0)])
RUNNING = _status(jobs=[(2, 2, 0, 0)])
COMPLETE = _status(("Complete", "JobsCompleted", "TrainJob is completed"), jobs=[(0, 0, 2, 0)])
FAILED = _status(("Failed", "TrainingRuntimeFailed",
                  "jobset failed: job node-0 has failed pods"), jobs=[(0, 0, 0, 1)])


class FakeKube:
    """Answers the TrainJob create, get and delete calls; each GET returns the next status."""

    def __init__(self, statuses, create_status=201):
        self.statuses, self.requests, self.created = list(statuses), [], None
        self.create_status = create_status
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(("POST", self.path))
                if owner.create_status != 201:
                    return self._reply(owner.create_status, {
                        "kind": "Status", "code": owner.create_status,
                        "message": "refused by the fake"})
                owner.created = body
                self._reply(201, body)

            def do_GET(self):
                owner.requests.append(("GET", self.path))
                if owner.created is None or not self.path.endswith(
                        "/" + owner.created["metadata"]["name"]):
                    return self._reply(404, {"kind": "Status", "code": 404})
                status = owner.statuses.pop(0) if len(owner.statuses) > 1 else owner.statuses[0]
                if isinstance(status, int):
                    return self._reply(status, {"kind": "Status", "code": status})
                self._reply(200, owner.created | status)

            def do_DELETE(self):
                owner.requests.append(("DELETE", self.path))
                self._reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def api(self):
        conf = kubernetes.client.Configuration()
        conf.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(conf))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"


def test_submit_and_wait_streams_status_until_complete(caplog):
    job = _job()
    with FakeKube([CREATED, 503, RUNNING, RUNNING, COMPLETE]) as kube, \
            caplog.at_level("INFO", logger=tj.__name__):
        final = tj.submit_and_wait(job, "team-a", timeout_s=60, poll_s=0, api=kube.api())
    assert kube.created == job.to_dict()
    assert kube.requests[0] == ("POST", PATH)
    assert kube.requests[1:] == [("GET", f"{PATH}/{job.metadata.name}")] * 5
    assert tj.phase(final) == ("Complete", "TrainJob is completed")
    phases = [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records
              if r.getMessage().startswith(f"TrainJob {job.metadata.name} is ")]
    assert phases == ["Created", "Running", "Complete"]  # each change once
    text = caplog.text
    assert "Complete=True (JobsCompleted) TrainJob is completed" in text
    assert "job node active=2 ready=2 succeeded=0 failed=0" in text
    assert "reading TrainJob" in text  # the 503 was retried


def test_submit_and_wait_raises_the_failure_message():
    with FakeKube([CREATED, RUNNING, FAILED]) as kube, \
            pytest.raises(tj.TrainJobFailed, match="job node-0 has failed pods"):
        tj.submit_and_wait(_job(), "team-a", timeout_s=60, poll_s=0, api=kube.api())


@pytest.mark.parametrize("code,hint", [(404, "Kubeflow Trainer installed"), (403, "RBAC")])
def test_submit_and_wait_explains_a_refused_create(code, hint):
    with FakeKube([RUNNING], create_status=code) as kube, \
            pytest.raises(RuntimeError, match=f"{code} .*refused by the fake.*{hint}"):
        tj.submit_and_wait(_job(), "team-a", timeout_s=60, poll_s=0, api=kube.api())
    assert [m for m, _ in kube.requests] == ["POST"]


def test_submit_and_wait_deletes_the_job_on_timeout():
    ticks = iter(range(100))
    with FakeKube([RUNNING]) as kube, pytest.raises(TimeoutError, match="last Running"):
        tj.submit_and_wait(_job(), "team-a", timeout_s=3, poll_s=0, api=kube.api(),
                           clock=lambda: next(ticks), sleep=lambda s: None)
    assert kube.requests[-1] == ("DELETE", f"{PATH}/{_job().metadata.name}")


# -- run() and the pods' entry, with gs:// mapped onto a local folder ---------------------------

class LocalGcs:
    """``storage`` with gs://bucket/... kept under a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def __getattr__(self, name):
        real = getattr(storage, name)
        if name == "download_dir":  # a local source: a plain copy
            real = storage.upload_dir
        if not callable(real) or name in ("is_gcs", "join", "basename"):
            return real
        return lambda *a, **kw: real(*(self.local(x) for x in a), **kw)

    def local(self, x):
        return str(self.root / x[len("gs://"):]) if isinstance(x, str) and x.startswith(
            "gs://") else x


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    gcs = LocalGcs(tmp_path / "gcs")
    monkeypatch.setattr(tj, "storage", gcs)
    # the lease on the checkpoint root: the local file's compare-and-swap, on the same folder
    monkeypatch.setattr(lease, "_file", lambda uri: lease._LocalFile(gcs.local(uri)))
    ns = tmp_path / "namespace"
    ns.write_text("team-a\n")
    monkeypatch.setattr(tj, "NAMESPACE_FILE", str(ns))
    monkeypatch.setattr(tj, "job_name", lambda *a, **kw: "notellm2-train-feedbeef")
    monkeypatch.setenv("NOTELLM2_IMAGE", IMAGE)
    monkeypatch.setenv("KFP_POD_NAME", "notellm2-xyz-train-123")
    monkeypatch.setenv("KFP_POD_UID", "3f0c")
    return gcs


def _kfp_paths(monkeypatch, tmp_path):
    """KFP shows gs://bkt/... to the task as /gcs/bkt/...; here that view is under tmp_path."""
    view = tmp_path / "gcs-view"
    real = tj.to_gcs_uri
    monkeypatch.setattr(tj, "to_gcs_uri", lambda p: real(
        "/gcs/" + os.path.relpath(p, view) if str(p).startswith(str(view)) else p))
    return view


def test_run_copies_the_model_into_the_kfp_artifact_folder(cluster, tmp_path, monkeypatch):
    view = _kfp_paths(monkeypatch, tmp_path)
    model_uri = "gs://bkt/root/train/model"
    res = tj.result_uri(model_uri, "notellm2-train-feedbeef")
    storage.write_text(cluster.local(model_uri + "/config.json"), "{}")
    storage.write_text(cluster.local(res + "/result.json"), json.dumps({"train/loss": 0.5}))
    kfp_model = str(view / "bkt" / "root" / "train" / "model")
    with FakeKube([RUNNING, COMPLETE]) as kube:
        final = tj.run(str(view / "bkt" / "root" / "validate" / "canonical"), kfp_model, _cfg(),
                       tracking_uri="http://mlflow:5000", run_id="r1", api=kube.api(), poll_s=0)
    assert final == {"train/loss": 0.5}
    assert os.path.isfile(os.path.join(kfp_model, "config.json"))
    assert kube.requests[0] == ("POST", PATH)
    created = kube.created
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "notellm2-xyz-train-123", "uid": "3f0c"}]
    assert created["spec"]["trainer"]["image"] == IMAGE
    cmd = created["spec"]["trainer"]["command"]
    assert cmd[cmd.index("--canonical") + 1] == "gs://bkt/root/validate/canonical"


def test_run_raises_the_failing_ranks_own_error(cluster):
    from components.train.worker import NonFiniteLoss

    res = tj.result_uri("gs://bkt/root/train/model", "notellm2-train-feedbeef")
    for rank, t in ((3, 2.0), (0, 1.0)):  # rank 0 failed first; rank 3 is its broken peer
        storage.write_text(cluster.local(f"{res}/error-rank-{rank:05d}.json"), json.dumps(
            {"rank": rank, "type": "NonFiniteLoss" if rank == 0 else "DistBackendError",
             "message": "loss is nan at step 7" if rank == 0 else "connection reset",
             "time": t, "traceback": ""}))
    with FakeKube([FAILED]) as kube, pytest.raises(
            NonFiniteLoss, match=r"rank 0 \(2 of 4 processes failed\): loss is nan at step 7"):
        tj.run("gs://bkt/root/canonical", "gs://bkt/root/train/model",
               _cfg("train.num_nodes=2", "train.nproc=2"),
               tracking_uri="https://mlflow.example", api=kube.api(), poll_s=0)


def test_the_train_step_hands_trainjob_runs_over(monkeypatch):
    from components.train import launch
    from components.train import run as train_run

    calls = []
    monkeypatch.setattr(tj, "run", lambda *a, **kw: calls.append((a, kw)) or {"loss": 1.0})
    monkeypatch.setattr(launch, "resolve_nproc", lambda t: pytest.fail("launched locally"))
    cfg = _cfg("train.gpus_per_node=8")  # more GPUs than this machine has: not checked here
    assert train_run.run("gs://b/c", "gs://b/m", cfg, tracking_uri="http://m", run_id="r") == {
        "loss": 1.0}
    assert calls == [(("gs://b/c", "gs://b/m", cfg), {"tracking_uri": "http://m", "run_id": "r"})]


def test_run_needs_a_gs_root_and_a_tracking_server(cluster, tmp_path):
    with pytest.raises(ValueError, match="gs:// pipeline root"):
        tj.run(str(tmp_path / "canonical"), "gs://bkt/m", _cfg(), tracking_uri="http://m:5000")
    with pytest.raises(ValueError, match="local to this pod"):
        tj.run("gs://bkt/c", "gs://bkt/m", _cfg(), tracking_uri="sqlite:///mlflow.db")


@pytest.mark.parametrize("fail", [False, True])
def test_pod_main_uploads_the_model_or_the_ranks_error(cluster, monkeypatch, fail):
    from components.train import worker

    seen = {}

    def fake_main(argv):  # what the worker leaves behind, without training
        job = worker.Job.load(argv[0])
        seen["job"] = job
        if fail:
            with open(os.path.join(job.result_dir, "error-rank-00000.json"), "w") as f:
                json.dump({"rank": 0, "type": "ValueError", "message": "bad", "time": 1.0,
                           "traceback": ""}, f)
            raise ValueError("bad")
        os.makedirs(job.model_out)
        with open(os.path.join(job.model_out, "model.safetensors"), "wb") as f:
            f.write(b"weights")
        with open(os.path.join(job.result_dir, "result.json"), "w") as f:
            json.dump({"train/loss": 0.25}, f)
        return 0

    monkeypatch.setattr(worker, "main", fake_main)
    monkeypatch.setenv("RANK", "0")
    cmd = _job(_cfg("train.nproc=2")).spec.trainer.command
    args = cmd[cmd.index("components.train.trainjob") + 1:]
    if fail:
        with pytest.raises(ValueError, match="bad"):
            tj.pod_main(args)
    else:
        assert tj.pod_main(args) == 0
    res = "gs://bkt/run/train/trainjob/notellm2-train-0a1b2c3d"
    job = seen["job"]
    assert job.canonical_dir == "gs://bkt/run/validate/canonical"
    assert not job.model_out.startswith("gs://") and job.threads >= 1
    assert job.config["train"]["checkpoint_dir"] == "gs://bkt/run/train/checkpoints"
    if fail:
        assert json.loads(storage.read_text(cluster.local(res + "/error-rank-00000.json")))[
            "message"] == "bad"
        assert not os.path.exists(cluster.local("gs://bkt/run/train/model"))
    else:
        assert storage.read_bytes(cluster.local("gs://bkt/run/train/model/model.safetensors")) \
            == b"weights"
        assert json.loads(storage.read_text(cluster.local(res + "/result.json"))) == {
            "train/loss": 0.25}
