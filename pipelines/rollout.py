"""``notellm2 rollout``: the KServe ``InferenceService`` for the registry's state.

KServe's canary model: an InferenceService holds ONE predictor spec. Applying a changed spec
with ``canaryTrafficPercent: N`` makes the new spec the latest revision and sends it N % of the
traffic; the rest stays on the last revision that was rolled out at 100 % (KServe tracks it).
Applying the same spec without ``canaryTrafficPercent`` rolls the latest revision out to 100 %.
So, from the aliases of the registered model:

- ``canary``: the challenger's model is the predictor's ``storageUri`` with
  ``canaryTrafficPercent`` = ``register.ab_traffic_challenger`` x 100 — correct only while the
  revision KServe has rolled out is the champion's (apply the ``champion`` stage first);
- ``champion``: the champion's model, no ``canaryTrafficPercent`` (100 %). After ``notellm2
  promote`` of the challenger this is the canary's spec minus the percent: KServe promotes the
  canary revision it already runs. After a rollback, or to abort a canary, it is a new spec
  that KServe rolls out to 100 % once ready.

``auto`` (the default) is ``canary`` when the challenger differs from the champion, was not
rolled back and gets a share, and ``champion`` otherwise.

Serving runtime: ``modelFormat: mlflow`` with the runtime ``notellm2-mlflow`` (a ServingRuntime
in ``manifests/serving``: ``mlflow models serve`` in the project image). KServe's stock MLflow
runtime (MLServer) cannot load this model: the pyfunc imports the project's ``model`` package,
torch and transformers, which MLServer's image does not carry. ``storageUri`` is the model
version's MLflow model folder (the one holding ``MLmodel``), which KServe's storage initializer
copies to ``/mnt/models``; it must be a URI KServe can pull (``gs://``, ``s3://``, ``pvc://``).
An MLflow server that proxies artifacts (``--serve-artifacts``, as manifests/ deploys it)
reports ``mlflow-artifacts:/<path>``: ``artifacts_destination`` (the server's
``--artifacts-destination``) turns that into ``<destination>/<path>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlparse

import click

CHAMPION, CHALLENGER = "champion", "challenger"
STAGES = ("auto", "canary", "champion")
# what KServe's storage initializer pulls (s3 and pvc for clusters that are not GKE)
PULLABLE = ("gs://", "s3://", "pvc://")
RUNTIME = "notellm2-mlflow"
SERVICE_ACCOUNT = "notellm2-serving"
NAMESPACE = "kubeflow-user-example-com"
UID = 10001
VERSION_ANNOTATION = "notellm2.io/model-version"


class RolloutError(ValueError):
    """The registry's state or the settings do not give a manifest (the message says why)."""


@dataclass
class Rollout:
    """What to deploy: the stage, both aliases' versions, the percent and the model URIs."""
    model_name: str
    stage: str
    champion: str
    champion_uri: str
    challenger: str | None = None
    challenger_uri: str | None = None
    percent: int | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        """The version of the predictor's spec (the latest revision)."""
        return self.challenger if self.stage == "canary" else self.champion

    @property
    def storage_uri(self) -> str:
        return self.challenger_uri if self.stage == "canary" else self.champion_uri


def canary_percent(share: float) -> int:
    """``register.ab_traffic_challenger`` (a fraction) as KServe's whole percent."""
    if not 0 <= share <= 1:
        raise RolloutError(f"register.ab_traffic_challenger = {share}: a share between 0 and 1")
    percent = round(share * 100)
    if not math.isclose(share * 100, percent, abs_tol=1e-6):
        raise RolloutError(f"register.ab_traffic_challenger = {share}: KServe's "
                           f"canaryTrafficPercent takes whole percents ({share * 100:g} %)")
    return percent


def storage_uri(source: str, artifacts_destination: str = "") -> str:
    """The URI KServe pulls for an MLflow artifact location."""
    parsed = urlparse(source)
    if parsed.scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise RolloutError(
                f"{source} is proxied by the MLflow server; pass --artifacts-destination (the "
                "server's --artifacts-destination, ARTIFACTS_DESTINATION in manifests/) so "
                "KServe can read the model where it lies")
        source = f"{artifacts_destination.rstrip('/')}/{parsed.path.lstrip('/')}"
    if not source.startswith(PULLABLE):
        raise RolloutError(f"{source}: KServe's storage initializer cannot pull this; the model "
                           f"must lie under {', '.join(PULLABLE)} (an MLflow artifact store "
                           "there)")
    return source


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def plan(client, name: str, share: float, *, stage: str = "auto",
         artifacts_destination: str = "") -> Rollout:
    """The rollout the registry's aliases call for (see the module's docstring)."""
    if stage not in STAGES:
        raise RolloutError(f"stage {stage!r}: one of {', '.join(STAGES)}")
    champ = _alias(client, name, CHAMPION)
    if champ is None:
        raise RolloutError(f"{name} has no '{CHAMPION}': nothing to serve. KServe gives the "
                           "first revision all traffic whatever the percent, so a challenger "
                           "is rolled out only once promoted (notellm2 promote)")
    chall = _alias(client, name, CHALLENGER)

    def uri(mv) -> str:
        return storage_uri(client.get_model_version_download_uri(name, mv.version),
                           artifacts_destination)

    out = Rollout(name, "champion", str(champ.version), uri(champ))
    why_not = None
    if chall is None:
        why_not = f"no '{CHALLENGER}' alias"
    elif str(chall.version) == out.champion:
        why_not = f"the {CHALLENGER} is the {CHAMPION} (version {out.champion})"
    elif chall.tags.get("rolled_back"):
        why_not = (f"{CHALLENGER} version {chall.version} was rolled back "
                   f"({chall.tags['rolled_back']})")
    elif stage != "champion":  # the share matters only for a canary
        percent = canary_percent(share)
        if percent == 0:
            why_not = "register.ab_traffic_challenger is 0"
        elif percent == 100:
            raise RolloutError("register.ab_traffic_challenger = 1: that is no canary; "
                               f"promote version {chall.version} instead")
    if stage == "champion" or (stage == "auto" and why_not):
        out.reasons.append(f"{CHAMPION} version {out.champion} at 100 %"
                           + (f": {why_not}" if why_not else " (--stage champion)"))
        return out
    if why_not:
        raise RolloutError(f"no canary: {why_not}")
    out.stage, out.percent = "canary", percent
    out.challenger, out.challenger_uri = str(chall.version), uri(chall)
    decision = chall.tags.get("decision")
    out.reasons.append(f"{CHALLENGER} version {out.challenger} at {percent} %, {CHAMPION} "
                       f"version {out.champion} (the rolled-out revision) the rest"
                       + (f"; the offline gate said {decision!r}" if decision else ""))
    return out


def inference_service(r: Rollout, *, name: str = "notellm2", namespace: str = NAMESPACE,
                      gpus: int = 0, min_replicas: int = 1, max_replicas: int = 2) -> dict:
    """The InferenceService for ``r``. The canary and the promoted spec differ only in
    ``canaryTrafficPercent``, so promoting the challenger starts no new revision."""
    resources = {"requests": {"cpu": "2", "memory": "8Gi"},
                 "limits": {"cpu": "4", "memory": "16Gi"}}
    if gpus:
        for kind in resources.values():
            kind["nvidia.com/gpu"] = str(gpus)
    predictor = {
        # storage read only: the account's cloud identity (GKE Workload Identity) may read the
        # model bucket; no Kubernetes API token is mounted
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "model": {
            "modelFormat": {"name": "mlflow"},
            "runtime": RUNTIME,
            "storageUri": r.storage_uri,
            # the server reads no file or bucket a request names (serving.py)
            "env": [{"name": "NOTELLM2_SERVING_IMAGE_PREFIXES", "value": ""}],
            "resources": resources,
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                             {"name": "home", "mountPath": "/home/notellm2"}],
        },
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    if r.stage == "canary":
        predictor["canaryTrafficPercent"] = r.percent
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "notellm2-serving",
                       "app.kubernetes.io/part-of": "notellm2"},
            # canary rollouts need Knative revisions; RawDeployment has none
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless",
                            VERSION_ANNOTATION: f"{r.model_name}/{r.version}"},
        },
        "spec": {"predictor": predictor},
    }


def render(r: Rollout, obj: dict) -> str:
    import yaml

    header = [f"# Generated by `notellm2 rollout` from the MLflow registry: {r.model_name}",
              f"# stage: {r.stage}; {CHAMPION}: version {r.champion} ({r.champion_uri})"]
    if r.stage == "canary":
        header.append(f"# {CHALLENGER}: version {r.challenger} ({r.challenger_uri}) at "
                      f"{r.percent} %")
    header += [f"# {reason}" for reason in r.reasons]
    header.append("# Apply: kubectl apply -f THIS_FILE (manifests/serving applied first)")
    return "\n".join(header) + "\n" + yaml.safe_dump(obj, sort_keys=False)


@click.command("rollout")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI).")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="Use the SQLite registry of a run-local work folder instead.")
@click.option("--set", "overrides", multiple=True, metavar="register.KEY=VALUE",
              help="Override register settings (model name, ab_traffic_challenger).")
@click.option("--artifacts-destination", envvar="NOTELLM2_ARTIFACTS_DESTINATION", default="",
              help="The MLflow server's --artifacts-destination (gs://...), to resolve "
                   "mlflow-artifacts:/ model locations.")
@click.option("--stage", type=click.Choice(STAGES), default="auto", show_default=True,
              help="canary: the challenger at the A/B share; champion: the champion at 100 %.")
@click.option("--name", "isvc_name", default="notellm2", show_default=True,
              help="InferenceService name.")
@click.option("--namespace", default=NAMESPACE, show_default=True)
@click.option("--gpus", default=0, show_default=True, help="GPUs per predictor pod.")
@click.option("--output", "-o", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (default: stdout).")
def rollout_cmd(tracking_uri, work, overrides, artifacts_destination, stage, isvc_name,
                namespace, gpus, output) -> None:
    """Write the KServe InferenceService for the registry's champion and challenger."""
    from pipelines.cli import _fail, _register_cfg, _registry

    client, cfg = _registry(tracking_uri, work), _register_cfg(overrides)
    try:
        r = plan(client, cfg.model_name, cfg.ab_traffic_challenger, stage=stage,
                 artifacts_destination=artifacts_destination)
    except RolloutError as e:
        _fail(str(e))
    text = render(r, inference_service(r, name=isvc_name, namespace=namespace, gpus=gpus))
    if output == "-":
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)
        for reason in r.reasons:
            click.echo(reason, err=True)
        click.echo(f"wrote {output}", err=True)
