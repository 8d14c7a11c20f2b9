"""Issue 15, items 10 and 11: a TrainJob per KFP task that retries, cancels and fails cleanly,
a lease on its checkpoint root, a process-group timeout for checkpoint uploads; a serving model
that reads no file it was not allowed to, and a KFP token that need not be on the command line.

The Kubernetes API is an in-memory fake with the CustomObjectsApi calls the code makes; gs://
is a local folder (tests/components/test_trainjob.py's LocalGcs); no pipeline runs."""

from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest

from components.common import storage
from components.common.config import resolve

pytestmark = pytest.mark.faults

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("kubeflow_trainer_api.models")

from kubernetes.client.exceptions import ApiException  # noqa: E402

from components.train import trainjob as tj  # noqa: E402
from tests.components.test_trainjob import LocalGcs  # noqa: E402

NS = "team-a"
MODEL = "gs://bkt/root/notellm2-run-1/train/model"
RUN_ID = "0f" * 16


def _cfg(*overrides: str):
    return resolve("tiny", ["train.launcher=trainjob", *overrides])


def _api_error(status: int) -> ApiException:
    e = ApiException(status=status, reason={404: "Not Found", 409: "Conflict"}.get(status, "x"))
    e.body = json.dumps({"message": f"fake {status}"})
    return e


COMPLETE = {"conditions": [{"type": "Complete", "status": "True", "message": "done"}]}
RUNNING = {"jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}


class MemKube:
    """The TrainJob calls of CustomObjectsApi on a dict. ``statuses``: what successive GETs of a
    running job show (the last repeats); ``on_get(n)``: called before the n-th GET."""

    def __init__(self, statuses=(RUNNING, COMPLETE), on_get=None):
        self.objects: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.statuses, self.on_get, self.gets, self.uids = list(statuses), on_get, 0, 0

    def seed(self, body: dict, status: dict) -> dict:
        self.uids += 1
        obj = json.loads(json.dumps(body))
        obj["metadata"]["uid"] = f"uid-{self.uids}"
        obj["status"] = status
        self.objects[obj["metadata"]["name"]] = obj
        return obj

    def create_namespaced_custom_object(self, group, version, ns, plural, body, **kw):
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.objects:
            raise _api_error(409)
        return self.seed(body, {})

    def get_namespaced_custom_object(self, group, version, ns, plural, name, **kw):
        self.gets += 1
        self.calls.append(("get", name))
        if self.on_get:
            self.on_get(self.gets)
        if name not in self.objects:
            raise _api_error(404)
        obj = self.objects[name]
        if not obj["status"]:  # one we created: it runs through `statuses`
            obj = obj | {"status": self.statuses.pop(0) if len(self.statuses) > 1
                         else self.statuses[0]}
        return obj

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, body=None,
                                        **kw):
        uid = ((body or {}).get("preconditions") or {}).get("uid")
        self.calls.append(("delete", name, uid))
        if name not in self.objects:
            raise _api_error(404)
        if uid and self.objects[name]["metadata"]["uid"] != uid:
            raise _api_error(409)
        del self.objects[name]
        return {"status": "Success"}

    def creates(self):
        return [c for c in self.calls if c[0] == "create"]

    def deletes(self):
        return [c for c in self.calls if c[0] == "delete"]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """gs:// under tmp_path (the lease's compare-and-swap too), the pod's namespace file."""
    gcs = LocalGcs(tmp_path / "gcs")
    monkeypatch.setattr(tj, "storage", gcs)
    try:
        from components.train import lease
    except ImportError:  # before issue 15 there was none; the tests say what is missing
        pass
    else:
        monkeypatch.setattr(lease, "_file", lambda uri: lease._LocalFile(gcs.local(uri)))
    ns = tmp_path / "namespace"
    ns.write_text(NS + "\n")
    monkeypatch.setattr(tj, "NAMESPACE_FILE", str(ns))
    monkeypatch.setenv("NOTELLM2_IMAGE", "registry.example/notellm2-kfp:0.1.0")
    for var in ("KFP_POD_NAME", "KFP_POD_UID"):
        monkeypatch.delenv(var, raising=False)
    return gcs


def _leave_result(gcs, name: str) -> None:
    storage.write_text(gcs.local(tj.result_uri(MODEL, name) + "/result.json"),
                       json.dumps({"train/loss": 0.5}))


def _run(kube, cfg=None):
    return tj.run("gs://bkt/root/canonical", MODEL, cfg or _cfg(),
                  tracking_uri="http://mlflow:5000", run_id=RUN_ID, api=kube, poll_s=0)


def _lease_path(gcs) -> str:
    from components.train.lease import LEASE_FILE

    return gcs.local(f"{MODEL.rsplit('/', 1)[0]}/checkpoints/{LEASE_FILE}")


# -- 10a: one TrainJob name per KFP task ---------------------------------------------------------

def test_trainjob_name_is_the_same_for_every_attempt_of_a_task_and_a_valid_k8s_name():
    import re

    first, again = tj.job_name(MODEL, RUN_ID), tj.job_name(MODEL, RUN_ID)
    assert first == again
    # another task's output, another pipeline run: another job
    assert tj.job_name(MODEL.replace("run-1", "run-2"), RUN_ID) != first
    assert tj.job_name(MODEL, "1e" * 16) != first
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", first)
    # the pods' host names (<job>-node-<i>-<j>) stay within a DNS label
    assert len(first) <= 40 and len(first + "-node-0-0") <= 63


def _earlier_attempt():
    """(config, the task's job name, an empty fake cluster, the job an earlier attempt of
    the same task created)."""
    cfg = _cfg()
    name = tj.job_name(MODEL, RUN_ID)
    earlier = tj.build_trainjob(name, cfg, "gs://bkt/root/canonical", MODEL,
                                tracking_uri="http://mlflow:5000", run_id=RUN_ID,
                                lease_owner=f"{NS}/{name}")
    return cfg, name, MemKube(), earlier


def test_a_retried_task_replaces_its_earlier_attempts_running_job(cluster):
    """Attempt 1 was killed (SIGKILL, node loss) and its job runs on; attempt 2 deletes that
    job (by its uid) and waits for it to go before it creates its own: never two at once."""
    cfg, name, kube, earlier = _earlier_attempt()
    old_uid = kube.seed(earlier.to_dict(), RUNNING)["metadata"]["uid"]
    _leave_result(cluster, name)
    assert _run(kube, cfg) == {"train/loss": 0.5}
    assert [c[1] for c in kube.creates()] == [name, name]  # refused once, then created
    first_delete = kube.calls.index(("delete", name, old_uid))
    # recreated only after a GET saw the old one gone
    assert kube.calls[first_delete + 1] == ("get", name)
    assert kube.calls[first_delete + 2] == ("create", name)
    assert len(kube.objects) == 1 and kube.objects[name]["metadata"]["uid"] != old_uid


def test_a_retried_task_adopts_its_earlier_attempts_completed_job(cluster):
    cfg, name, kube, earlier = _earlier_attempt()
    kube.seed(earlier.to_dict(), COMPLETE)
    _leave_result(cluster, name)
    assert _run(kube, cfg) == {"train/loss": 0.5}
    assert kube.creates() == [("create", name)] and kube.deletes() == []  # nothing retrained


# -- 10b: the job goes when the task goes --------------------------------------------------------

def test_an_error_while_waiting_deletes_the_trainjob_and_frees_the_lease(cluster):
    def fail(n):
        if n == 2:
            raise _api_error(401)

    kube = MemKube(statuses=[RUNNING], on_get=fail)
    with pytest.raises(ApiException):
        _run(kube)
    name = tj.job_name(MODEL, RUN_ID)
    assert kube.deletes() == [("delete", name, "uid-1")] and kube.objects == {}
    assert not os.path.exists(_lease_path(cluster))


def test_sigterm_deletes_the_trainjob(cluster):
    """KFP cancels a run by deleting its pods: SIGTERM must end the wait through ``finally``
    (deleting the job), not end the process on the spot."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # the test's guard

    def cancel(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        if n > 20:
            raise RuntimeError("SIGTERM did not end the wait")

    kube = MemKube(statuses=[RUNNING], on_get=cancel)
    try:
        with pytest.raises(tj.Terminated):
            _run(kube, _cfg("train.trainjob_timeout_s=3600"))
        assert seen == []  # the task's own handler took it
    finally:
        signal.signal(signal.SIGTERM, previous)
    name = tj.job_name(MODEL, RUN_ID)
    assert kube.deletes() == [("delete", name, "uid-1")] and kube.objects == {}
    assert not os.path.exists(_lease_path(cluster))
    assert signal.getsignal(signal.SIGTERM) is previous  # restored afterwards


def test_the_timeout_deletes_the_trainjob_only_by_its_uid(cluster):
    """The timeout deletes the job; the delete names the uid it created, so it can never remove
    a later attempt's job of the same name."""
    ticks = iter(range(1000))
    kube = MemKube(statuses=[RUNNING])
    job = tj.build_trainjob(tj.job_name(MODEL, RUN_ID), _cfg(), "gs://bkt/root/canonical",
                            MODEL)
    with pytest.raises(TimeoutError):
        tj.submit_and_wait(job, NS, timeout_s=3, poll_s=0, api=kube,
                           clock=lambda: next(ticks), sleep=lambda s: None)
    assert kube.deletes() == [("delete", job.metadata.name, "uid-1")]


# -- 10c: a lease on the checkpoint root ---------------------------------------------------------

def test_lease_refuses_a_second_owner_renews_the_same_and_takes_over_a_stale_one(tmp_path):
    from components.train import lease

    now = [1000.0]
    root = str(tmp_path / "checkpoints")
    a = lease.Lease(root, "ns/job-a", ttl_s=600, clock=lambda: now[0])
    b = lease.Lease(root, "ns/job-b", ttl_s=600, clock=lambda: now[0])
    a.acquire()
    with pytest.raises(lease.LeaseHeld, match="job-a"):
        b.acquire()
    lease.Lease(root, "ns/job-a", ttl_s=600, clock=lambda: now[0]).acquire()  # a retry: ok
    now[0] += 500
    a.renew()  # the heartbeat keeps it live
    now[0] += 500
    with pytest.raises(lease.LeaseHeld):
        b.acquire()
    now[0] += 101  # 601 s without a renewal: stale
    b.acquire()
    assert b.read()["owner"] == "ns/job-b"
    with pytest.raises(lease.LeaseLost):
        a.renew()
    with pytest.raises(lease.LeaseLost):
        lease.verify(root, "ns/job-a")
    lease.verify(root, "ns/job-b")
    a.release()  # not a's any more: left alone
    assert b.read()["owner"] == "ns/job-b"
    b.release()
    assert b.read() is None


class _PreconditionFailed(Exception):
    code = 412


class _FakeBucket:
    """GCS objects with generations and ``if_generation_match``, as the real service has."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 0

    def blob(self, name):
        bucket = self

        class Blob:
            generation = None

            def reload(self):
                from google.api_core.exceptions import NotFound

                if name not in bucket.objects:
                    raise NotFound("no such object")
                self.generation = bucket.objects[name][1]

            def _check(self, want):
                have = bucket.objects.get(name, (None, 0))[1]
                if want is not None and want != have:
                    raise _PreconditionFailed(f"generation {have}, not {want}")

            def download_as_bytes(self, if_generation_match=None):
                self._check(if_generation_match)
                return bucket.objects[name][0]

            def upload_from_string(self, data, content_type=None, if_generation_match=None):
                self._check(if_generation_match)
                bucket.generation += 1
                bucket.objects[name] = (bytes(data), bucket.generation)

            def delete(self, if_generation_match=None):
                self._check(if_generation_match)
                bucket.objects.pop(name, None)

        return Blob()


def test_lease_on_gcs_is_a_compare_and_swap_on_the_generation(monkeypatch):
    """Two owners that both find a stale lease: only one takes it over."""
    from components.train import lease

    bucket = _FakeBucket()
    monkeypatch.setattr(lease.storage, "_bucket_blob",
                        lambda uri: bucket.blob(uri.split("/", 3)[3]))
    now = [0.0]
    root = "gs://bkt/run/train/checkpoints"
    lease.Lease(root, "ns/old", ttl_s=60, clock=lambda: now[0]).acquire()
    now[0] = 1000.0
    b = lease.Lease(root, "ns/job-b", ttl_s=60, clock=lambda: now[0])
    c = lease.Lease(root, "ns/job-c", ttl_s=60, clock=lambda: now[0])
    # c reads the stale lease, then b takes it over before c writes
    real_get = c._file.get
    stale = real_get()

    raced = []

    def get_then_lose_the_race():
        if raced:
            return real_get()
        raced.append(True)
        b.acquire()  # b wins between c's read and c's write
        return stale

    c._file.get = get_then_lose_the_race
    with pytest.raises(lease.LeaseHeld, match="job-b"):
        c.acquire()
    assert b.read()["owner"] == "ns/job-b"


def test_a_live_lease_of_another_job_fails_the_task_before_it_creates_a_trainjob(cluster):
    from components.train import lease

    root = tj.checkpoint_root(_cfg(), MODEL)
    lease.Lease(root, "team-b/notellm2-train-other").acquire()
    kube = MemKube()
    with pytest.raises(lease.LeaseHeld, match="notellm2-train-other"):
        _run(kube)
    assert kube.calls == []


def test_the_task_renews_its_lease_while_the_job_runs_and_the_pods_know_its_id(cluster):
    from components.train import lease

    renewals = []
    real = lease.Lease.renew

    def renew(self):
        renewals.append(self.owner)
        return real(self)

    kube = MemKube(statuses=[RUNNING, RUNNING, RUNNING, COMPLETE])
    _leave_result(cluster, tj.job_name(MODEL, RUN_ID))
    cfg = _cfg("train.lease_ttl_s=60")
    clock = iter(range(0, 10_000, 20))  # 20 s between polls: renew every 15 s (ttl / 4)
    lease_mod = pytest.MonkeyPatch()
    lease_mod.setattr(lease.Lease, "renew", renew)
    lease_mod.setattr(lease.time, "time", lambda: float(next(clock)))
    try:
        _run(kube, cfg)
    finally:
        lease_mod.undo()
    owner = f"{NS}/{tj.job_name(MODEL, RUN_ID)}"
    assert renewals and set(renewals) == {owner}
    (obj,) = kube.objects.values()
    env = {e["name"]: e.get("value") for e in obj["spec"]["trainer"]["env"]}
    assert env[lease.OWNER_ENV] == owner


# -- 10d: process-group timeout ------------------------------------------------------------------

def test_process_group_timeout_is_a_setting_sized_for_checkpoint_uploads_and_reaches_the_pods():
    assert resolve("tiny").train.pg_timeout_s >= 1800  # above NCCL's 10-minute default
    with pytest.raises(ValueError, match="pg_timeout_s"):
        resolve("tiny", ["train.pg_timeout_s=5"])
    cfg = _cfg("train.pg_timeout_s=7200")
    cmd = tj.build_trainjob("notellm2-train-0a1b2c3d4e", cfg, "gs://b/c", "gs://b/r/train/model",
                            image="x:1").spec.trainer.command
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert resolve(cmd[cmd.index("--preset") + 1], sets).train.pg_timeout_s == 7200


# -- 11a: serving reads no image it was not allowed to -------------------------------------------

def _png(size=(8, 6), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _policy(monkeypatch, **env):
    from components.register import serving

    for key in (serving.PREFIXES_ENV, serving.MAX_BYTES_ENV, serving.MAX_PIXELS_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(getattr(serving, key), value)
    return serving.ImagePolicy.from_env()


def test_serving_refuses_image_uris_unless_under_a_configured_prefix(tmp_path, monkeypatch):
    from components.register import serving

    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    (allowed / "link.png").symlink_to(secret)

    default = _policy(monkeypatch)
    with pytest.raises(serving.ImageRefused, match=serving.PREFIXES_ENV) as e:
        default.image({"image_uri": str(allowed / "a.png")})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400, not a 500
    with pytest.raises(serving.ImageRefused):
        default.image({"image_uri": "gs://bkt/images/a.png"})

    policy = _policy(monkeypatch, PREFIXES_ENV=f"{allowed},gs://bkt/images/")
    assert policy.image({"image_uri": str(allowed / "a.png")}).size == (8, 6)
    for uri in (str(secret), str(allowed / ".." / "secret.png"), str(allowed / "link.png"),
                str(allowed), "gs://bkt/images-other/a.png", "gs://bkt/images/../keys/k.json",
                "gs://bkt/other/a.png", "https://example.com/a.png", "file:///etc/passwd"):
        with pytest.raises(serving.ImageRefused):
            policy.image({"image_uri": uri})


def test_serving_takes_image_bytes_within_byte_and_pixel_caps(monkeypatch):
    from components.register import serving

    policy = _policy(monkeypatch, MAX_BYTES_ENV="4000", MAX_PIXELS_ENV="10000")
    assert policy.image({"image": _png((100, 100))}).size == (100, 100)
    assert policy.image({"image": b"", "image_uri": None}) is None
    with pytest.raises(serving.ImageRefused, match="pixels"):
        policy.image({"image": _png((101, 100), mode="1")})  # tiny file, too many pixels
    with pytest.raises(serving.ImageRefused, match="bytes"):
        policy.image({"image": b"\x89PNG" + bytes(4000)})
    with pytest.raises(serving.ImageRefused, match="not a readable image"):
        policy.image({"image": b"not an image"})


def test_served_model_predicts_from_bytes_and_refuses_a_uri(tmp_path, monkeypatch):
    import pandas as pd

    import model as model_pkg
    from components.register import serving

    _policy(monkeypatch)
    seen = []

    def fake_encode(m, notes, progress=False):
        seen.extend(notes)
        return np.ones((len(notes), 4), dtype=np.float32)

    monkeypatch.setattr(model_pkg, "encode", fake_encode)
    enc = serving.NoteEncoder()
    enc.model = object()
    out = enc.predict(None, pd.DataFrame({"title": ["a", "b"], "content": ["x", "y"],
                                          "image": [_png(), b""]}))
    assert out.shape == (2, 4) and seen[0].image.size == (8, 6) and seen[1].image is None
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    with pytest.raises(serving.ImageRefused):
        enc.predict(None, pd.DataFrame({"title": ["a"], "content": ["x"],
                                        "image_uri": [str(path)]}))


# -- 11b: the KFP token from the environment or a file -------------------------------------------

@pytest.fixture
def submit_calls(monkeypatch, tmp_path):
    import pipelines.compile
    import pipelines.submit as sub

    calls = []
    monkeypatch.delenv("NOTELLM2_KFP_TOKEN", raising=False)
    monkeypatch.setattr(pipelines.compile, "compile_pipeline", lambda path, **kw: path)
    monkeypatch.setattr(sub, "pipeline_parameters", lambda package: {})
    monkeypatch.setattr(sub, "submit", lambda host, **kw: calls.append(kw) or {
        "uploaded": None, "pipeline_version_name": "v", "url": "http://kfp/#/runs/1"})
    return calls


def test_submit_token_from_the_environment_or_a_file(submit_calls, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipelines.submit import submit_cmd

    def submit(*args, env=None):
        return CliRunner().invoke(submit_cmd, ["--host", "http://kfp", *args], env=env)

    r = submit(env={"NOTELLM2_KFP_TOKEN": "from-env"})
    assert r.exit_code == 0, r.output
    assert submit_calls[-1]["existing_token"] == "from-env"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    r = submit("--token-file", str(token))
    assert r.exit_code == 0, r.output
    assert submit_calls[-1]["existing_token"] == "from-file"
    r = CliRunner().invoke(submit_cmd, ["--host", "http://kfp", "--token-file", "-"],
                           input="from-stdin\n")
    assert r.exit_code == 0 and submit_calls[-1]["existing_token"] == "from-stdin"
    # still accepted on the command line, with a warning; both at once is an error
    r = submit("--token", "on-argv")
    assert r.exit_code == 0 and submit_calls[-1]["existing_token"] == "on-argv"
    assert "warning" in r.output and "NOTELLM2_KFP_TOKEN" in r.output
    r = submit("--token", "x", "--token-file", str(token))
    assert r.exit_code == 1 and "not both" in r.output
    help_text = CliRunner().invoke(submit_cmd, ["--help"]).output
    assert "--token-file" in help_text and "NOTELLM2_KFP_TOKEN" in help_text
