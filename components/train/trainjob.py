"""``train.launcher=trainjob``: the training processes run in a Kubeflow Trainer ``TrainJob``.

The KFP task builds a ``TrainJob`` (:func:`build_trainjob`, typed with the ``kubeflow-trainer-api``
models), creates it with the Kubernetes API in the task's namespace, logs its conditions as they
change and waits for ``Complete`` or ``Failed`` (:func:`submit_and_wait`), then copies the
exported model from ``gs://`` into its own output artifact (:func:`run`).

How the command meets the runtime. ``train.trainjob_runtime`` names a ClusterTrainingRuntime with
the torch ML policy. For every one of ``num_nodes`` pods the Trainer controller injects
``PET_NNODES``, ``PET_NPROC_PER_NODE`` (from the TrainJob's ``numProcPerNode``), ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` into the ``node`` container; it does not wrap the
command. The TrainJob's ``trainer.command`` replaces the runtime's, so ours starts ``torchrun``
itself, with no size flags: torchrun reads each of its flags from ``PET_<FLAG>`` when it is not
on the command line. torchrun then starts ``numProcPerNode`` copies of :func:`pod_main`
(``python -m components.train.trainjob``), which takes the worker's own flags (``--canonical
--model-out --preset --set --tracking-uri --run-id``, see ``worker._job_from_args``) plus
``--result-uri``, and runs :func:`components.train.worker.main` in the process.

Why not ``python -m components.train.worker`` directly: the worker exports the model and writes
its result and error files to local folders. :func:`pod_main` points them at a temporary folder in
the pod and, on rank 0, uploads the model to the ``gs://`` model URI and ``result.json`` to the
result URI; a failing rank uploads its error there, so the KFP task can raise the rank's own
error rather than the TrainJob's "failed" condition. Checkpoints go to ``gs://`` directly (the
default ``<parent of the model>/checkpoints`` is pinned with ``train.checkpoint_dir``), so a
restarted TrainJob or KFP task resumes from them.

Why not ``TrainerClient.train``: it builds the TrainJob from a runtime it reads from the cluster,
takes environment variables only as plain values (no Secret references) and sets no command for a
container trainer; its ``wait_for_job_status`` lists pods and drops the failure message. The
create call here is the one it makes (``CustomObjectsApi.create_namespaced_custom_object`` with
``TrainJob.to_dict()``).

Faults. The job's name is derived from the task's output URI and the pipeline's MLflow run id
(:func:`job_name`), the same for every attempt of a KFP task: a retried task adopts its earlier
attempt's job when that completed the same spec, and otherwise deletes it (by uid, waiting until
it is gone) before creating its own, so two jobs of one task never run at once. While the job
runs, the task holds a lease on the checkpoint root (:mod:`components.train.lease`, renewed on
every poll, ``train.lease_ttl_s``): a root another job is writing fails the task before anything
is created. SIGTERM (a KFP cancel deletes the task's pod) raises :class:`Terminated`, and every
exit but ``Complete``/``Failed`` (error, timeout, SIGTERM) deletes the job in ``finally`` and
frees the lease; a SIGKILLed task leaves the job to the ownerReference on its pod and to the
next attempt. ``train.pg_timeout_s`` travels to the pods in the configuration (the worker's
process-group timeout, sized for checkpoint uploads).

What the cluster must provide (manifests): the ClusterTrainingRuntime (torch policy, a ``node``
job, the GCS credentials mount or Workload Identity, GPU node placement, ``/dev/shm``, a
writable ``/tmp`` big enough for one exported model), and RBAC for the KFP pipeline runner's
service account to create, get and delete ``trainjobs`` in the namespace. The TrainJob replaces
the runtime container's command and its resources (``resourcesPerNode`` replaces, it does not
merge: set ``train.cpu_per_node`` and ``train.memory_per_node``); env is merged.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

from components.common import storage
from components.common.config import DEFAULT_PRESET, RunConfig, TrainConfig, resolve

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
RUNTIME_KIND = "ClusterTrainingRuntime"
GPU = "nvidia.com/gpu"
# the pipeline's optional MLflow credentials Secret (pipelines/pipeline.py MLFLOW_SECRET)
MLFLOW_SECRET = "notellm2-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# KFP (v2) maps a gs:// artifact URI to this local prefix in the task's container
KFP_GCS_PREFIX = "/gcs/"
LABEL_PREFIX = "notellm2.io/"
SPEC_HASH = LABEL_PREFIX + "spec-hash"
REQUEST_TIMEOUT_S = 60  # per Kubernetes API call: a stalled connection is retried, not waited on
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class TrainJobFailed(RuntimeError):
    """The TrainJob ended ``Failed`` (or was deleted); the message holds the controller's."""


class Terminated(BaseException):
    """The KFP task got SIGTERM (a run's cancel, the pod's deletion). Raised from the signal
    handler so that ``finally`` blocks run: the TrainJob is deleted and the lease released.
    A ``BaseException``, so that no ``except Exception`` on the way swallows it."""


# -- paths and config --------------------------------------------------------------------------

def to_gcs_uri(path: str) -> str:
    """``gs://`` URI of a KFP artifact path: ``/gcs/<bucket>/<path>`` is KFP's local view of
    ``gs://<bucket>/<path>``. Other local paths are errors: the TrainJob's pods run on other
    nodes and cannot see them."""
    if storage.is_gcs(path):
        return path
    if str(path).startswith(KFP_GCS_PREFIX) and len(str(path)) > len(KFP_GCS_PREFIX):
        return storage.GS + str(path)[len(KFP_GCS_PREFIX):]
    raise ValueError(
        f"train.launcher=trainjob trains in other pods, which cannot see this task's local path "
        f"{path!r}: run the pipeline with a gs:// pipeline root (KFP shows its artifacts to the "
        f"task as {KFP_GCS_PREFIX}<bucket>/...), or train in the task with train.launcher=local")


def result_uri(model_out_uri: str, name: str) -> str:
    """Where the pods leave ``result.json`` and their errors: beside the model, one per job."""
    return storage.join(model_out_uri.rstrip("/").rsplit("/", 1)[0], "trainjob", name)


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return json.dumps(list(v))
    return repr(v) if isinstance(v, float) else str(v)


def config_overrides(cfg: RunConfig, preset: str = DEFAULT_PRESET) -> list[str]:
    """``section.key=value`` strings that turn ``preset`` into ``cfg`` (for the worker's
    ``--set``); checked to resolve back to exactly ``cfg``."""
    base = resolve(preset).flat()
    out = [f"{k}={_value(v)}" for k, v in cfg.flat().items() if base[k] != v]
    if resolve(preset, out) != cfg:  # a value that does not survive the text round trip
        raise ValueError(f"cannot express the configuration as overrides of preset {preset!r}")
    return out


def procs_per_node(t: TrainConfig) -> int:
    """``train.nproc`` (0 = one per GPU, 1 on CPU), at most one per GPU."""
    if t.gpus_per_node and t.nproc > t.gpus_per_node:
        raise ValueError(f"train.nproc={t.nproc} but train.gpus_per_node={t.gpus_per_node}: one "
                         "process per GPU (train.nproc=0 takes them all)")
    return t.nproc or max(1, t.gpus_per_node)


def job_name(model_uri: str, run_id: str = "", prefix: str = "notellm2-train") -> str:
    """The TrainJob's name: the same for every attempt of one KFP task, so that a retried task
    finds the job of its earlier attempt (to adopt it when it completed, else to replace it)
    instead of starting a second one beside it. KFP retries a task with the same executor
    input, so its output artifact URI (``model_uri``, which holds the KFP run's id and the
    task's) and the pipeline's MLflow run id are stable across attempts and differ between
    tasks and runs.

    Short, and a DNS-1035 label: the JobSet, its Jobs and pods add suffixes, and pod host names
    stop at 63 characters."""
    digest = hashlib.sha256(f"{model_uri.rstrip('/')}\n{run_id}".encode()).hexdigest()
    return f"{prefix}-{digest[:10]}"


def spec_hash(job) -> str:
    """A digest of what the TrainJob runs (its spec): an earlier attempt's job is adopted only
    when it ran exactly this."""
    return _digest(job.to_dict()["spec"])


def _digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def label_value(v: str) -> str:
    """``v`` cut to a valid label value (63 characters of ``[-A-Za-z0-9_.]``, alphanumeric ends)."""
    v = re.sub(r"[^-A-Za-z0-9_.]", "-", v)[:63].strip("-_.")
    return v if _LABEL_VALUE.match(v) else ""


def own_namespace() -> str:
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip()
    except OSError:
        raise RuntimeError(f"train.trainjob_namespace is empty and {NAMESPACE_FILE} is missing "
                           "(not in a pod?): set train.trainjob_namespace") from None


# -- the TrainJob ------------------------------------------------------------------------------

def build_trainjob(name: str, cfg: RunConfig, canonical_uri: str, model_out_uri: str, *,
                   preset: str = DEFAULT_PRESET, overrides: list[str] | None = None,
                   tracking_uri: str = "", run_id: str = "", image: str = "",
                   owner: dict | None = None, lease_owner: str = ""):
    """The TrainJob (a ``kubeflow_trainer_api`` ``TrainerV1alpha1TrainJob``) that trains ``cfg``.

    ``preset`` + ``overrides`` reach the worker as ``--preset``/``--set``; without ``overrides``
    they are derived from ``cfg``. Either way they must resolve to ``cfg`` (plus the pinned
    checkpoint folder). ``owner``: an ``ownerReferences`` entry (the KFP task's pod), so that
    deleting the run's pods deletes the TrainJob too. ``lease_owner``: the id of the lease on
    the checkpoint root that the launching task holds (default: ``name``), for the pods in
    ``$NOTELLM2_CHECKPOINT_LEASE_OWNER``."""
    from kubeflow_trainer_api import models as m

    from components.common.image import component_image
    from components.train import lease
    from components.train.checkpoint import default_root

    t = cfg.train
    for uri in (canonical_uri, model_out_uri):
        if not storage.is_gcs(uri):
            raise ValueError(f"TrainJob pods read and write gs:// only, not {uri!r}")
    # the pods export to a local folder and upload it; pin the checkpoints beside the model
    pods_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        t, checkpoint_dir=default_root(model_out_uri, t.checkpoint_dir)))
    sets = config_overrides(pods_cfg, preset) if overrides is None else list(overrides)
    if resolve(preset, sets) != pods_cfg:
        raise ValueError(f"preset {preset!r} with overrides {sets} is not the configuration "
                         "being trained")
    command = ["torchrun", "-m", "components.train.trainjob",
               "--canonical", canonical_uri, "--model-out", model_out_uri,
               "--result-uri", result_uri(model_out_uri, name), "--preset", preset]
    for s in sets:
        command += ["--set", s]
    if tracking_uri:
        command += ["--tracking-uri", tracking_uri]
    if run_id:
        command += ["--run-id", run_id]

    env = [m.IoK8sApiCoreV1EnvVar(name="PYTHONUNBUFFERED", value="1"),
           # whose lease on the checkpoint root the pods write under (components/train/lease.py)
           m.IoK8sApiCoreV1EnvVar(name=lease.OWNER_ENV, value=lease_owner or name)]
    if not t.gpus_per_node:  # DeepSpeed picks its accelerator from what it sees; say CPU
        env.append(m.IoK8sApiCoreV1EnvVar(name="DS_ACCELERATOR", value="cpu"))
    # credentials by reference: the Secret stays in the cluster, optional like the task's own
    env += [m.IoK8sApiCoreV1EnvVar(name=key, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=MLFLOW_SECRET, key=key,
                                                         optional=True)))
            for key in MLFLOW_SECRET_KEYS]

    # The controller replaces the runtime container's resources with these, so a CPU job says
    # "0 GPUs" (the runtime's default asks for one) and cpu/memory must be given to be requested
    resources = {GPU: m.IoK8sApimachineryPkgApiResourceQuantity(str(t.gpus_per_node))}
    if t.cpu_per_node:
        resources["cpu"] = m.IoK8sApimachineryPkgApiResourceQuantity(t.cpu_per_node)
    if t.memory_per_node:
        resources["memory"] = m.IoK8sApimachineryPkgApiResourceQuantity(t.memory_per_node)

    labels = {"app.kubernetes.io/name": "notellm2", "app.kubernetes.io/component": "train"}
    if label_value(run_id):
        labels[LABEL_PREFIX + "mlflow-run-id"] = label_value(run_id)
    annotations = {LABEL_PREFIX + "model-uri": model_out_uri}
    if owner:
        annotations[LABEL_PREFIX + "kfp-pod"] = owner["name"]

    spec = m.TrainerV1alpha1TrainJobSpec(
        runtime_ref=m.TrainerV1alpha1RuntimeRef(name=t.trainjob_runtime, kind=RUNTIME_KIND,
                                                api_group=GROUP),
        active_deadline_seconds=t.trainjob_timeout_s,
        trainer=m.TrainerV1alpha1Trainer(
            image=image or t.trainjob_image or component_image(),
            command=command,
            num_nodes=t.num_nodes,
            num_proc_per_node=procs_per_node(t),
            # requests = limits: GPUs allow nothing else, and a training pod should not be
            # the first one evicted
            resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                requests=resources, limits=resources),
            env=env,
        ),
    )
    annotations[SPEC_HASH] = _digest(spec.to_dict())
    return m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, labels=labels, annotations=annotations,
            owner_references=[m.IoK8sApimachineryPkgApisMetaV1OwnerReference(**owner)]
            if owner else None),
        spec=spec,
    )


def kfp_owner() -> dict | None:
    """An ownerReference to the KFP task's pod (KFP puts its name and uid in the environment)."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    return {"api_version": "v1", "kind": "Pod", "name": name, "uid": uid}


# -- submitting and watching -------------------------------------------------------------------

def custom_objects_api():
    """A CustomObjectsApi on the in-cluster service account (or the local kube config)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.CustomObjectsApi()


def phase(obj: dict) -> tuple[str, str]:
    """(``Created`` | ``Running`` | ``Suspended`` | ``Complete`` | ``Failed``, message) of a
    TrainJob as the API returns it. ``Complete`` and ``Failed`` are conditions the controller
    sets; ``Running`` (not a condition) is a child Job with a ready or finished pod."""
    status = obj.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []
             if c.get("status") == "True"}
    for kind in ("Failed", "Complete", "Suspended"):
        if kind in conds:
            return kind, conds[kind].get("message", "")
    if any(j.get("ready", 0) or j.get("succeeded", 0) for j in status.get("jobsStatus") or []):
        return "Running", ""
    return "Created", ""


def _retryable(e: Exception) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(e, ApiException):
        return e.status in (0, 408, 429) or e.status >= 500
    return isinstance(e, (HTTPError, OSError))


def _api_message(e) -> str:
    try:
        return json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(e.body or "")


class _EarlierJobRemains(RuntimeError):
    """An earlier attempt's TrainJob could not be deleted: it may still be training."""


def _create(api, job, namespace: str) -> dict:
    """Create ``job``; when a job of that name exists already (an earlier attempt of this task,
    see :func:`job_name`), adopt it if it completed the same spec, else replace it: delete it,
    wait until it and its pods are gone, create ours. Returns the object to watch."""
    from kubernetes.client.exceptions import ApiException

    name, body = job.metadata.name, job.to_dict()
    for attempt in range(2):
        try:
            return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body,
                                                       _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as e:
            if e.status != 409 or attempt:
                hint = {403: "does this pod's service account have RBAC to create trainjobs?",
                        404: "is Kubeflow Trainer installed, and does the namespace exist?",
                        409: "it is still there after being deleted"}.get(e.status, "")
                raise RuntimeError(f"could not create TrainJob {namespace}/{name}: {e.status} "
                                   f"{e.reason}: {_api_message(e)} {hint}".rstrip()) from e
        try:
            old = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as e:
            if e.status != 404:
                raise
            continue  # gone meanwhile: create again
        meta = old.get("metadata") or {}
        same = (meta.get("annotations") or {}).get(SPEC_HASH) == spec_hash(job)
        state = phase(old)[0]
        if same and state == "Complete":
            log.info("TrainJob %s/%s of an earlier attempt of this task completed the same "
                     "spec: adopting its result", namespace, name)
            return old
        log.warning("TrainJob %s/%s of an earlier attempt of this task is still there (%s%s): "
                    "replacing it; the new job resumes from the newest checkpoint", namespace,
                    name, state, "" if same else ", another spec")
        if not _delete(api, namespace, name, meta.get("uid")):
            raise _EarlierJobRemains(f"could not delete the earlier TrainJob {namespace}/{name}")
        _wait_gone(api, namespace, name)
    raise AssertionError("unreachable")


def _delete(api, namespace: str, name: str, uid: str | None = None) -> bool:
    """Delete TrainJob ``name`` (only the object with ``uid``, when given: never a later
    attempt's job of the same name) with its JobSet and pods. True when it is deleted or gone."""
    from kubernetes.client.exceptions import ApiException

    body: dict = {"propagationPolicy": "Foreground"}
    if uid:
        body["preconditions"] = {"uid": uid}
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body,
                                            _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404:
            return True
        if e.status == 409:  # the uid precondition: the name now belongs to another job
            log.warning("TrainJob %s/%s is another job now; left alone", namespace, name)
            return True
        log.warning("could not delete TrainJob %s/%s: %s %s", namespace, name, e.status,
                    e.reason)
        return False
    except Exception as e:
        log.warning("could not delete TrainJob %s/%s: %s", namespace, name, e)
        return False
    log.info("deleted TrainJob %s/%s", namespace, name)
    return True


def _wait_gone(api, namespace: str, name: str, timeout_s: float = 300.0, poll_s: float = 2.0,
               *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = clock() + timeout_s
    while clock() < deadline:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                             _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as e:
            if e.status == 404:
                return
        sleep(poll_s)
    raise TimeoutError(f"TrainJob {namespace}/{name} was still there {timeout_s:g} s after "
                       "its deletion")


def submit_and_wait(job, namespace: str, timeout_s: float, poll_s: float = 15.0, *, api=None,
                    max_errors: int = 10, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep,
                    heartbeat: Callable[[], None] | None = None,
                    on_exit: Callable[[bool], None] | None = None) -> dict:
    """Create ``job`` in ``namespace`` (or adopt / replace an earlier attempt's, see
    :func:`_create`), log its conditions and child-job counts as they change, and return the
    finished object once it is ``Complete``. ``Failed`` (or a deleted job) raises
    :class:`TrainJobFailed` with the controller's message; ``timeout_s`` without an end raises
    ``TimeoutError``. ``max_errors`` API errors in a row (5xx, throttling, a lost connection)
    end the wait; fewer are retried.

    On every exit but ``Complete`` and ``Failed`` (the timeout, an error, SIGTERM as
    :class:`Terminated`), ``finally`` deletes the job: nothing keeps training when its task is
    gone. A finished job is kept (its pods' logs); the ownerReference to the task's pod lets
    Kubernetes collect it with the pod. ``heartbeat`` is called once per poll (the lease);
    ``on_exit(gone)`` last, with whether the job has ended or was deleted."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api()
    name = job.metadata.name
    try:
        created = _create(api, job, namespace)
    except BaseException as e:  # nothing of ours runs, unless an earlier attempt's job does
        if on_exit is not None:
            on_exit(not isinstance(e, _EarlierJobRemains))
        raise
    uid = ((created or {}).get("metadata") or {}).get("uid")
    log.info("TrainJob %s/%s (runtime %s, %d node(s) x %d process(es)); logs: kubectl -n "
             "%s logs -f -l jobset.sigs.k8s.io/jobset-name=%s", namespace, name,
             job.spec.runtime_ref.name, job.spec.trainer.num_nodes,
             job.spec.trainer.num_proc_per_node, namespace, name)
    deadline = clock() + timeout_s
    seen_conds: dict[str, tuple] = {}
    seen_jobs: dict[str, tuple] = {}
    last_phase, errors = "", 0
    ended = False
    try:
        while True:
            try:
                obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       _request_timeout=REQUEST_TIMEOUT_S)
                errors = 0
            except ApiException as e:
                if e.status == 404:
                    ended = True
                    raise TrainJobFailed(f"TrainJob {namespace}/{name} was deleted") from e
                errors += 1
                if not _retryable(e) or errors >= max_errors:
                    raise
                log.warning("reading TrainJob %s failed (%d/%d): %s", name, errors, max_errors,
                            e.reason)
                obj = None
            except Exception as e:
                errors += 1
                if not _retryable(e) or errors >= max_errors:
                    raise
                log.warning("reading TrainJob %s failed (%d/%d): %s", name, errors, max_errors,
                            e)
                obj = None
            if obj is not None:
                status = obj.get("status") or {}
                for c in status.get("conditions") or []:
                    key = (c.get("status"), c.get("reason"), c.get("message"))
                    if seen_conds.get(c.get("type")) != key:
                        seen_conds[c.get("type")] = key
                        log.info("TrainJob %s: %s=%s (%s) %s", name, c.get("type"), *key)
                for j in status.get("jobsStatus") or []:
                    counts = tuple(j.get(k, 0) for k in ("active", "ready", "succeeded",
                                                         "failed", "suspended"))
                    if seen_jobs.get(j.get("name")) != counts:
                        seen_jobs[j.get("name")] = counts
                        log.info("TrainJob %s: job %s active=%d ready=%d succeeded=%d "
                                 "failed=%d suspended=%d", name, j.get("name"), *counts)
                now, message = phase(obj)
                if now != last_phase:
                    log.info("TrainJob %s is %s", name, now)
                    last_phase = now
                if now == "Complete":
                    ended = True
                    return obj
                if now == "Failed":
                    ended = True
                    raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {message}")
            if clock() >= deadline:
                raise TimeoutError(f"TrainJob {namespace}/{name} did not finish in "
                                   f"{timeout_s:g} s (last {last_phase or 'unknown'}); "
                                   "deleted it")
            if heartbeat is not None:
                heartbeat()
            sleep(poll_s)
    finally:
        if not ended:  # still running: stop it, whatever the reason for leaving
            ended = _delete(api, namespace, name, uid)
        if on_exit is not None:
            on_exit(ended)


# -- the KFP task's side -----------------------------------------------------------------------

def _check_tracking_uri(uri: str) -> str:
    from components.common import tracking

    uri = tracking.tracking_uri(uri)
    if urlparse(uri).scheme in ("", "file", "sqlite"):
        raise ValueError(f"MLflow tracking URI {uri!r} is local to this pod; the TrainJob's pods "
                         "need a tracking server (http(s)://...)")
    return uri


def _rank_error(res_uri: str, world: int, cause: TrainJobFailed) -> Exception:
    """The earliest rank's own error that the pods left under ``res_uri``, else ``cause``."""
    from components.train import launch

    try:
        names = [n for n in storage.list_files(res_uri) if n.startswith("error-rank-")]
    except Exception as e:  # the TrainJob's failure is what matters; say why there is no more
        log.warning("could not read the ranks' errors under %s: %s", res_uri, e)
        return cause
    if not names:
        return cause
    with tempfile.TemporaryDirectory(prefix="notellm2-trainjob-") as tmp:
        for n in names:
            storage.copy(storage.join(res_uri, n), os.path.join(tmp, n))
        return launch._failure(tmp, 1, world, collections.deque([str(cause)]))


@contextlib.contextmanager
def sigterm_raises():
    """While inside: SIGTERM raises :class:`Terminated` in the main thread (Python's default
    ends the process without running ``finally``). KFP cancels a run by deleting its pods, and
    Kubernetes asks a container to stop with SIGTERM before it kills it. A second SIGTERM while
    the first one's cleanup runs is logged, not raised. Outside the main thread (where no
    handler can be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            log.warning("signal %d again: still cleaning up", signum)
            return
        fired.append(signum)
        raise Terminated(f"signal {signum} (SIGTERM: the run was cancelled or the pod is being "
                         "deleted)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def checkpoint_root(cfg: RunConfig, model_uri: str) -> str:
    """Where the TrainJob's pods write their checkpoints (pinned by :func:`build_trainjob`)."""
    from components.train.checkpoint import default_root

    return default_root(model_uri, cfg.train.checkpoint_dir)


def run(canonical_dir: str, model_out: str, cfg: RunConfig, *, tracking_uri: str = "",
        run_id: str = "", api=None, poll_s: float = 15.0) -> dict[str, float]:
    """Train ``cfg`` in a TrainJob on the ``gs://`` data behind ``canonical_dir``; the model lands
    at the ``gs://`` URI behind ``model_out`` and is copied into ``model_out`` when that is KFP's
    local view of it. Returns rank 0's final metrics.

    Faults: the job's name is the same for every attempt of this task (:func:`job_name`), so a
    retried task adopts or replaces its earlier attempt's job rather than running a second one;
    the task holds the lease on the checkpoint root while the job runs (a live lease of another
    owner fails this task before anything is created); an exception, the timeout or SIGTERM
    deletes the job before the task ends."""
    from components.train import lease

    t = cfg.train
    canonical_uri, model_uri = to_gcs_uri(canonical_dir), to_gcs_uri(model_out)
    tracking_uri = _check_tracking_uri(tracking_uri)
    namespace = t.trainjob_namespace or own_namespace()
    # an owner must live in the same namespace
    owner = kfp_owner() if namespace == _try_own_namespace() else None
    if not (t.cpu_per_node and t.memory_per_node):
        log.warning("train.cpu_per_node / train.memory_per_node unset: the TrainJob's pods "
                    "request no cpu / memory (resourcesPerNode replaces the runtime's)")
    name = job_name(model_uri, run_id)
    lease_owner = f"{namespace}/{name}"
    job = build_trainjob(name, cfg, canonical_uri, model_uri, tracking_uri=tracking_uri,
                         run_id=run_id, owner=owner, lease_owner=lease_owner)
    res = result_uri(model_uri, name)
    held = lease.Lease(checkpoint_root(cfg, model_uri), lease_owner, t.lease_ttl_s)

    def heartbeat() -> None:
        try:
            held.maybe_renew()
        except lease.LeaseLost:
            raise
        except Exception as e:  # a storage hiccup: the next poll tries again
            log.warning("could not renew the lease on %s: %s", held.root, e)

    def on_exit(gone: bool) -> None:
        if gone:
            held.release()
        else:  # the job may still write: let the lease run out rather than free it
            log.warning("TrainJob %s/%s may still run; its lease on %s expires in at most "
                        "%g s", namespace, name, held.root, t.lease_ttl_s)

    with sigterm_raises():
        held.acquire()
        log.info("holding the lease on checkpoint root %s as %s", held.root, lease_owner)
        try:
            submit_and_wait(job, namespace, t.trainjob_timeout_s, poll_s, api=api,
                            heartbeat=heartbeat, on_exit=on_exit)
        except TrainJobFailed as e:
            world = job.spec.trainer.num_nodes * job.spec.trainer.num_proc_per_node
            raise _rank_error(res, world, e) from e
    if model_out != model_uri:  # KFP uploads this folder to model_uri after the task
        log.info("copying the model from %s to %s", model_uri, model_out)
        storage.download_dir(model_uri, model_out)
    return json.loads(storage.read_text(storage.join(res, "result.json")))


def _try_own_namespace() -> str:
    try:
        return own_namespace()
    except RuntimeError:
        return ""


# -- the TrainJob pods' side -------------------------------------------------------------------

def pod_main(argv: list[str] | None = None) -> int:
    """One training process in a TrainJob pod (started by torchrun): the worker, with its model
    and result files in a local folder that rank 0 uploads, and a failing rank's error uploaded
    for the KFP task to raise."""
    import torch

    from components.train import launch, worker

    ap = argparse.ArgumentParser(prog="python -m components.train.trainjob", allow_abbrev=False)
    ap.add_argument("--result-uri", required=True)
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    job = worker._job_from_args(rest)
    rank = int(os.environ.get("RANK", "0"))
    threads = job.threads
    if not threads and not torch.cuda.is_available():  # torchrun would leave one thread each
        threads = max(1, _cpus(launch.cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with tempfile.TemporaryDirectory(prefix="notellm2-trainjob-") as tmp:
        local = dataclasses.replace(job, model_out=os.path.join(tmp, "model"), result_dir=tmp,
                                    threads=threads)
        path = os.path.join(tmp, "job.json")
        local.save(path)
        try:
            worker.main([path])
        except BaseException:  # worker.main has set up the logging
            for n in os.listdir(tmp):
                if n.startswith("error-rank-"):
                    try:
                        storage.copy(os.path.join(tmp, n), storage.join(a.result_uri, n))
                    except Exception as e:  # keep the training error, not the upload's
                        log.warning("could not upload %s: %s", n, e)
            raise
        if rank == 0:
            log.info("uploading the model to %s", job.model_out)
            storage.upload_dir(local.model_out, job.model_out)
            storage.copy(os.path.join(tmp, "result.json"),
                         storage.join(a.result_uri, "result.json"))
    return 0


def _cpus(cores: int) -> int:
    """The pod's CPU limit (cgroup v2 ``cpu.max``) when it has one, else ``cores``."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, min(cores, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


if __name__ == "__main__":
    sys.exit(pod_main())
