"""``notellm2 submit`` against a loopback emulation of the KFP v2beta1 REST API.

The fake server answers the endpoints kfp.Client 2.17 calls (read from kfp/client/client.py and
the generated kfp_server_api) and checks each request the way the API server does: method and
path, query strings, multipart upload of a KFP IR YAML, JSON bodies that reference an existing
experiment and pipeline version, runtime parameters the uploaded pipeline declares with values of
the declared types, a 6-field cron. Any request it does not expect is an error, so the tests also
pin the exact sequence of calls.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from click.testing import CliRunner

from pipelines.submit import parse_params, submit_cmd, validate_cron

API = "/apis/v2beta1"
PY_TYPES = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float),
            "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}


class FakeKFP:
    """State and request log of the emulated API server."""

    def __init__(self):
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id -> version (with "spec")
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}
        self.lock = threading.Lock()

    def calls(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of every request since the ``since``-th, pipeline ids as {pid}."""
        out = []
        for r in self.requests[since:]:
            path = r["path"]
            for pid in self.pipelines:
                path = path.replace(pid, "{pid}")
            out.append((r["method"], path))
        return out


def _filter_name(q: dict, errors: list[str]) -> str | None:
    """The display name of an EQUALS display_name filter, as kfp.Client writes it."""
    raw = q.get("filter", [""])[0]
    if not raw:
        return None
    preds = json.loads(raw)["predicates"]
    # protojson takes the enum by name or number; kfp.Client sends 1 (EQUALS)
    if len(preds) != 1 or preds[0].get("operation") not in ("EQUALS", 1) \
            or preds[0].get("key") != "display_name" or "stringValue" not in preds[0]:
        errors.append(f"unexpected filter {raw}")
        return None
    return preds[0]["stringValue"]


def _handler(kfp: FakeKFP):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_DELETE(self):
            self._serve("DELETE")

        def _serve(self, method: str):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = {"method": method, "path": url.path, "query": parse_qs(url.query,
                                                                         keep_blank_values=True),
                   "content_type": self.headers.get("Content-Type", ""),
                   "authorization": self.headers.get("Authorization"), "raw": body}
            with kfp.lock:
                kfp.requests.append(req)
                if (method, url.path) in kfp.refuse:
                    status, message = kfp.refuse[(method, url.path)]
                    return self._reply(status, {"error_message": message, "code": 7})
                try:
                    status, payload = self._route(method, url.path, req, body)
                except (KeyError, TypeError, ValueError, AssertionError) as e:
                    status, payload = 400, {"error_message": f"bad request: {e!r}"}
                if status >= 400:
                    kfp.errors.append(f"{method} {url.path}: {status} {payload}")
                self._reply(status, payload)

        def _reply(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, req: dict, body: bytes) -> dict:
            assert req["content_type"].startswith("application/json"), req["content_type"]
            return json.loads(body)

        def _route(self, method: str, path: str, req: dict, body: bytes) -> tuple[int, dict]:
            q = req["query"]
            if (method, path) == ("GET", f"{API}/healthz"):
                return 200, {"multi_user": False, "pipeline_store": "database"}
            if (method, path) == ("GET", f"{API}/pipelines"):
                name = _filter_name(q, kfp.errors)
                ns = q.get("namespace", [""])[0]
                hits = [p for p in kfp.pipelines.values()
                        if (name is None or p["display_name"] == name)
                        and p.get("namespace", "") == ns]
                # protojson leaves empty lists out: kfp.Client must cope with no "pipelines" key
                return 200, ({"pipelines": hits, "total_size": len(hits)} if hits else {})
            if (method, path) == ("POST", f"{API}/pipelines/upload"):
                spec = self._upload(req, body)
                name = q["name"][0]
                assert name.strip(), "empty pipeline name"
                if any(p["display_name"] == name for p in kfp.pipelines.values()):
                    return 409, {"error_message": "pipeline already exists"}
                pid = str(uuid.uuid4())
                pipe = {"pipeline_id": pid, "name": name, "display_name": name,
                        "description": q.get("description", [""])[0],
                        "namespace": q.get("namespace", [""])[0]}
                kfp.pipelines[pid] = pipe
                # like the real server: the first version is named after the pipeline
                self._add_version(pid, name, spec)
                return 200, pipe
            if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
                spec = self._upload(req, body)
                pid, name = q["pipelineid"][0], q["name"][0]
                if pid not in kfp.pipelines:
                    return 404, {"error_message": f"pipeline {pid} not found"}
                if any(v["pipeline_id"] == pid and v["display_name"] == name
                       for v in kfp.versions.values()):
                    return 409, {"error_message": "pipeline version already exists"}
                return 200, self._public(self._add_version(pid, name, spec))
            if method == "GET" and path.startswith(f"{API}/pipelines/") \
                    and path.endswith("/versions"):
                pid = path.split("/")[-2]
                if pid not in kfp.pipelines:
                    return 404, {"error_message": f"pipeline {pid} not found"}
                name = _filter_name(q, kfp.errors)
                hits = [self._public(v) for v in kfp.versions.values()
                        if v["pipeline_id"] == pid and (name is None or v["display_name"] == name)]
                return 200, ({"pipeline_versions": hits, "total_size": len(hits)} if hits else {})
            if (method, path) == ("GET", f"{API}/experiments"):
                name = _filter_name(q, kfp.errors)
                ns = q.get("namespace", [""])[0]
                hits = [e for e in kfp.experiments.values()
                        if (name is None or e["display_name"] == name)
                        and e.get("namespace", "") == ns]
                return 200, ({"experiments": hits, "total_size": len(hits)} if hits else {})
            if (method, path) == ("POST", f"{API}/experiments"):
                exp = self._json(req, body)
                assert set(exp) <= {"display_name", "description", "namespace"}, exp
                assert exp["display_name"].strip()
                exp = {**exp, "experiment_id": str(uuid.uuid4()), "storage_state": "AVAILABLE"}
                kfp.experiments[exp["experiment_id"]] = exp
                return 200, exp
            if (method, path) == ("POST", f"{API}/runs"):
                run = self._json(req, body)
                self._check_run(run)
                run = {**run, "run_id": str(uuid.uuid4()), "state": "PENDING"}
                kfp.runs[run["run_id"]] = run
                return 200, run
            if (method, path) == ("POST", f"{API}/recurringruns"):
                rec = self._json(req, body)
                self._check_run(rec)
                cron = rec["trigger"]["cron_schedule"]["cron"]
                assert len(cron.split()) == 6, f"cron {cron!r} is not 6 fields"
                assert "periodic_schedule" not in rec["trigger"]
                assert rec["mode"] in ("ENABLE", "DISABLE"), rec["mode"]
                assert 1 <= int(rec.get("max_concurrency", 1)) <= 10
                rec = {**rec, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
                kfp.recurring[rec["recurring_run_id"]] = rec
                return 200, rec
            return 404, {"error_message": f"no route {method} {path}"}

        def _upload(self, req: dict, body: bytes) -> dict:
            """The KFP IR from a multipart upload with an ``uploadfile`` part, as the server's
            ``r.FormFile("uploadfile")`` reads it."""
            ctype = req["content_type"]
            assert ctype.startswith("multipart/form-data; boundary="), ctype
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + body)
            parts = {p.get_param("name", header="content-disposition"): p
                     for p in msg.iter_parts()}
            assert set(parts) == {"uploadfile"}, set(parts)
            part = parts["uploadfile"]
            assert part.get_filename().endswith((".yaml", ".yml")), part.get_filename()
            data = part.get_payload(decode=True)
            req["uploaded"] = data
            docs = list(yaml.safe_load_all(data))
            assert docs[0]["pipelineInfo"]["name"] and docs[0]["root"]["dag"]["tasks"]
            return docs[0]

        def _add_version(self, pid: str, name: str, spec: dict) -> dict:
            vid = str(uuid.uuid4())
            v = {"pipeline_id": pid, "pipeline_version_id": vid, "name": name,
                 "display_name": name, "spec": spec}
            kfp.versions[vid] = v
            return v

        @staticmethod
        def _public(v: dict) -> dict:
            return {k: x for k, x in v.items() if k != "spec"}

        def _check_run(self, run: dict) -> None:
            assert run["display_name"].strip(), "empty run name"
            assert run["experiment_id"] in kfp.experiments, "unknown experiment"
            assert "pipeline_spec" not in run, "run carries an inline spec, not a version"
            ref = run["pipeline_version_reference"]
            assert set(ref) == {"pipeline_id", "pipeline_version_id"}, ref
            version = kfp.versions[ref["pipeline_version_id"]]
            assert version["pipeline_id"] == ref["pipeline_id"], "version of another pipeline"
            declared = version["spec"]["root"]["inputDefinitions"]["parameters"]
            params = run["runtime_config"]["parameters"]
            assert set(params) <= set(declared), set(params) - set(declared)
            for k, v in params.items():
                kind = declared[k]["parameterType"]
                assert isinstance(v, PY_TYPES[kind]) and not (
                    isinstance(v, bool) and kind != "BOOLEAN"), (k, v, kind)

    return Handler


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    import kfp.client
    import kfp.client.client

    for var in ("KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "NOTELLM2_IMAGE",
                "NOTELLM2_KFP_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # nothing from this machine's kfp context or an in-cluster token may leak in
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT",
                        str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr(kfp.client, "KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    state = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


DATA = "gs://bucket/notes"


def _submit(kfp_api, *args: str, data: bool = True):
    """``notellm2 submit`` with ``args``, plus the required ``data_uri`` unless given or
    ``data`` is False."""
    if data and not any(a.startswith("data_uri=") for a in args):
        args = (*args, "--param", f"data_uri={DATA}")
    return CliRunner().invoke(submit_cmd, ["--host", kfp_api.host, *args])


def _compiled_yaml(tmp_path) -> bytes:
    from pipelines.compile import compile_pipeline

    return open(compile_pipeline(str(tmp_path / "p.yaml"), kubernetes=True), "rb").read()


def test_first_submit_uploads_same_yaml_reuses_changed_param_runs(kfp_api, tmp_path):
    args = ["--experiment", "nightly", "--run-name", "first",
            "--param", "data_uri=gs://bucket/notes", "--param", "overrides=train.max_steps=50",
            "--param", "overrides=train.batch_pairs=8", "--param", "train_gpus=8",
            "--param", 'node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}']
    r = _submit(kfp_api, *args)
    assert r.exit_code == 0, r.output
    assert kfp_api.errors == []
    assert kfp_api.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/pipelines"),                  # look the pipeline up by name
        ("POST", f"{API}/pipelines/upload"),          # absent: upload it
        ("POST", f"{API}/pipelines/upload_version"),  # and the version named by content
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),               # experiment created when missing
        ("POST", f"{API}/runs"),
    ]
    lookup, upload, upload_version = kfp_api.requests[1:4]
    assert json.loads(lookup["query"]["filter"][0])["predicates"][0]["stringValue"] == "notellm2"
    assert upload["query"]["name"] == ["notellm2"]
    # what goes up is exactly the compiled pipeline, with its kfp-kubernetes platform spec
    assert upload["uploaded"] == upload_version["uploaded"] == _compiled_yaml(tmp_path)
    assert len(list(yaml.safe_load_all(upload["uploaded"]))) == 2
    (pipe,) = kfp_api.pipelines.values()
    assert upload_version["query"]["pipelineid"] == [pipe["pipeline_id"]]
    version_name = upload_version["query"]["name"][0]
    assert version_name.startswith("0.1.0-") and len(version_name) == len("0.1.0-") + 12
    (exp,) = kfp_api.experiments.values()
    assert exp["display_name"] == "nightly"
    (run,) = kfp_api.runs.values()
    version = next(v for v in kfp_api.versions.values() if v["display_name"] == version_name)
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipe["pipeline_id"], "pipeline_version_id": version["pipeline_version_id"]}
    assert run["experiment_id"] == exp["experiment_id"] and run["display_name"] == "first"
    assert run["runtime_config"]["parameters"] == {
        "data_uri": "gs://bucket/notes", "overrides": ["train.max_steps=50", "train.batch_pairs=8"],
        "train_gpus": 8, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}}
    assert f"{kfp_api.host}/#/runs/details/{run['run_id']}" in r.output
    assert "uploaded new pipeline" in r.output

    # the same YAML again: the version is found by name and reused, nothing is uploaded
    n = len(kfp_api.requests)
    r = _submit(kfp_api, *args)
    assert r.exit_code == 0, r.output
    assert kfp_api.calls(n) == [("GET", f"{API}/healthz"), ("GET", f"{API}/pipelines"),
                                ("GET", f"{API}/pipelines/{{pid}}/versions"),
                                ("GET", f"{API}/experiments"), ("POST", f"{API}/runs")]
    query = kfp_api.requests[n + 2]["query"]
    assert json.loads(query["filter"][0])["predicates"][0]["stringValue"] == version_name
    assert "reused version" in r.output and len(kfp_api.experiments) == 1

    # a changed parameter: a new run with it, on the same version
    n = len(kfp_api.requests)
    r = _submit(kfp_api, "--experiment", "nightly", "--param", "preset=qwen2-0.5b-clip-b16",
                "--param", "train_gpus=4", "--param", "run_name=2024-06-01")
    assert r.exit_code == 0, r.output
    assert ("POST", f"{API}/pipelines/upload_version") not in kfp_api.calls(n)
    new = json.loads(kfp_api.requests[-1]["raw"])
    assert new["runtime_config"]["parameters"] == {
        "preset": "qwen2-0.5b-clip-b16", "train_gpus": 4, "run_name": "2024-06-01",
        "data_uri": DATA}
    assert new["pipeline_version_reference"]["pipeline_version_id"] == \
        version["pipeline_version_id"]
    assert new["display_name"].startswith("notellm2 ")  # default run name
    assert len(kfp_api.runs) == 3 and len(kfp_api.versions) == 2
    assert kfp_api.errors == []


def test_recurring_run(kfp_api):
    r = _submit(kfp_api, "--recurring", "0 0 2 * * *", "--run-name", "nightly retrain",
                "--param", "preset=tiny")
    assert r.exit_code == 0, r.output
    assert kfp_api.errors == []
    assert kfp_api.calls()[-1] == ("POST", f"{API}/recurringruns")
    assert not kfp_api.runs
    (rec,) = kfp_api.recurring.values()
    assert rec["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert rec["mode"] == "ENABLE" and rec["no_catchup"] is True and rec["max_concurrency"] == 1
    assert rec["display_name"] == "nightly retrain"
    assert rec["runtime_config"]["parameters"] == {"preset": "tiny", "data_uri": DATA}
    (exp,) = kfp_api.experiments.values()
    assert rec["experiment_id"] == exp["experiment_id"] and exp["display_name"] == "Default"
    ref = rec["pipeline_version_reference"]
    assert kfp_api.versions[ref["pipeline_version_id"]]["pipeline_id"] == ref["pipeline_id"]
    assert f"{kfp_api.host}/#/recurringrun/details/{rec['recurring_run_id']}" in r.output


@pytest.mark.parametrize("cron, says", [
    ("0 2 * * *", "for this schedule write '0 0 2 * * *'"),
    ("0 61 * * * *", "minute field '61': 61 outside 0-59"),
    ("0 0 2 * * 7", "day-of-week field '7': 7 outside 0-6"),
    ("@every soon", "Go duration"),
])
def test_bad_cron_fails_before_contacting_kfp(kfp_api, cron, says):
    r = _submit(kfp_api, "--recurring", cron)
    assert r.exit_code == 1
    assert f"error: bad cron '{cron}'" in r.output and says in r.output
    assert kfp_api.requests == []


def test_unknown_or_mistyped_param_fails_clearly(kfp_api):
    r = _submit(kfp_api, "--param", "data_url=gs://x")
    assert r.exit_code == 1
    assert "unknown pipeline parameter data_url; the pipeline takes: " in r.output
    valid = {v.strip(",") for v in r.output.split("the pipeline takes: ")[1].split()}
    assert {"data_uri", "overrides", "train_gpus", "tolerations"} <= valid  # from the spec
    r = _submit(kfp_api, "--param", "train_gpus=two")
    assert r.exit_code == 1 and "train_gpus takes an integer (NUMBER_INTEGER)" in r.output
    r = _submit(kfp_api, "--param", "preset=tiny", "--param", "preset=qwen2-7b-clip-b16")
    assert r.exit_code == 1 and "given twice" in r.output
    r = _submit(kfp_api, "--param", "preset=tiny", data=False)  # data_uri has no default
    assert r.exit_code == 1 and "missing required pipeline parameter data_uri" in r.output
    assert kfp_api.requests == []


def test_auth_token_and_namespace(kfp_api, tmp_path, monkeypatch):
    r = _submit(kfp_api, "--token", "s3cret", "--namespace", "team-a")
    assert r.exit_code == 0, r.output
    assert kfp_api.errors == []
    assert {q["authorization"] for q in kfp_api.requests} == {"Bearer s3cret"}
    # a namespace given: no healthz probe, and pipeline, experiment and lookups all in it
    calls = kfp_api.calls()
    assert ("GET", f"{API}/healthz") not in calls
    by_call = dict(zip(calls, kfp_api.requests, strict=False))
    assert by_call[("GET", f"{API}/pipelines")]["query"]["namespace"] == ["team-a"]
    assert by_call[("POST", f"{API}/pipelines/upload")]["query"]["namespace"] == ["team-a"]
    assert by_call[("GET", f"{API}/experiments")]["query"]["namespace"] == ["team-a"]
    (exp,) = kfp_api.experiments.values()
    assert exp["namespace"] == "team-a"

    # the token file kfp reads in a pod ($KF_PIPELINES_SA_TOKEN_PATH), refreshed per client
    token = tmp_path / "token"
    token.write_text("from-file\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    n = len(kfp_api.requests)
    r = _submit(kfp_api, "--namespace", "team-a")
    assert r.exit_code == 0, r.output
    assert {q["authorization"] for q in kfp_api.requests[n:]} == {"Bearer from-file"}
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    r = _submit(kfp_api)
    assert r.exit_code == 1 and "KF_PIPELINES_SA_TOKEN_PATH names" in r.output


def test_api_refusal_is_reported(kfp_api):
    kfp_api.refuse[("POST", f"{API}/runs")] = (403, "user alice cannot create runs in kubeflow")
    r = _submit(kfp_api)
    assert r.exit_code == 1
    assert "KFP API at http://127.0.0.1" in r.output and "answered 403" in r.output
    assert "user alice cannot create runs in kubeflow" in r.output and "--token" in r.output


def test_parse_params():
    types = {"overrides": "LIST", "preset": "STRING", "train_gpus": "NUMBER_INTEGER",
             "node_selector": "STRUCT"}
    assert parse_params(["overrides=a.b=1", 'overrides=["c=2", "d=3"]', "preset=123",
                         "train_gpus=2", 'node_selector={"k": "v"}'], types) == {
        "overrides": ["a.b=1", "c=2", "d=3"], "preset": "123", "train_gpus": 2,
        "node_selector": {"k": "v"}}
    # without types: JSON where it parses, repeated keys collect
    assert parse_params(["x=1", "x=[2]", "y=hi", "z="]) == {"x": [1, 2], "y": "hi", "z": ""}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_params(["novalue"])


def test_validate_cron_accepts_kfp_forms():
    for cron in ("0 0 2 * * *", "*/15 * * * * ?", "0 0 9 ? * MON-FRI", "0 30 1 1 jan,jul *",
                 "@daily", "@every 1h30m"):
        assert validate_cron(cron) == cron


def test_recurring_refresh_pipeline(kfp_api):
    """``--pipeline refresh``: the index refresh goes up as its own pipeline, run on a schedule,
    every task uncached (each run must read the registry and the index of the moment)."""
    r = _submit(kfp_api, "--pipeline", "refresh", "--recurring", "0 0 * * * *",
                "--param", "data_uri=gs://bucket/new-notes", "--param", "embed_gpus=1")
    assert r.exit_code == 0, r.output
    assert kfp_api.errors == []
    upload = next(q for q in kfp_api.requests if q["path"] == f"{API}/pipelines/upload")
    assert upload["query"]["name"] == ["notellm2-refresh"]
    spec, platform = yaml.safe_load_all(upload["uploaded"])
    assert spec["pipelineInfo"]["name"] == "notellm2-refresh"
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "validate-new-notes", "refresh-index"}
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    assert "model_alias" in spec["root"]["inputDefinitions"]["parameters"]
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]  # Secrets etc.
    (rec,) = kfp_api.recurring.values()
    assert rec["trigger"] == {"cron_schedule": {"cron": "0 0 * * * *"}}
    assert rec["runtime_config"]["parameters"] == {"data_uri": "gs://bucket/new-notes",
                                                   "embed_gpus": 1}
    r = _submit(kfp_api, "--pipeline", "refresh", "--param", "train_gpus=1")
    assert r.exit_code != 0 and "unknown pipeline parameter" in r.output
