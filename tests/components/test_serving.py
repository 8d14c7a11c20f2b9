"""The registered model behind a real ``mlflow models serve``: the REST answer for a few test
notes, their images sent as bytes, equals what the pipeline's embed step wrote for them; an
``image_uri`` the server was not told it may read is refused with a 400. The related-notes
model served beside it answers note ids and new notes with a direct FAISS search's results.
Both models carry their own code: loaded in a fresh process that cannot import the repository,
their modules come from the model's ``code/`` folder."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow
MODEL_URI = "models:/notellm2@challenger"


@pytest.fixture(scope="module")
def pipeline_work(demo_pipeline) -> str:
    """The shared pipeline run (tests/conftest.py), its MLflow store in the work folder."""
    return demo_pipeline[0]


def _version(pipeline_work: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline_work}/mlflow.db")
    return client.get_model_version_by_alias("notellm2", "challenger")


# run with `python -I` (no PYTHONPATH, no cwd on sys.path) in an empty folder; the venv's
# editable install of the product is switched off too, so only the model's code/ can serve
FRESH_LOAD = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
for name in ("model", "components"):
    try:
        __import__(name)
        raise SystemExit(f"{name} importable without the model's code")
    except ImportError:
        pass
import mlflow, pandas as pd
out = {}
for key, path in json.loads(sys.argv[1]).items():
    for name in [n for n in sys.modules if n.split(".")[0] in ("model", "components")]:
        del sys.modules[name]  # each model from its own copy
    m = mlflow.pyfunc.load_model(path)
    import components.register.request as req, model
    frame = pd.DataFrame({"title": ["Weekend hike"], "content": ["three lakes"], "image": [b""]})
    if key == "related":
        frame["note_id"] = [""]
        pred = m.predict(frame, params={"k": 2})["related_ids"].tolist()
    else:
        pred = m.predict(frame).tolist()
    out[key] = {"files": [model.__file__, req.__file__], "prediction": pred}
print(json.dumps(out))
"""


def test_logged_models_carry_their_code_and_load_without_the_repository(pipeline_work,
                                                                        tmp_path):
    import mlflow

    mv = _version(pipeline_work)
    uris = {"model": f"models:/notellm2/{mv.version}", "related": mv.tags["related_model_uri"]}
    mlflow.set_tracking_uri(f"sqlite:///{pipeline_work}/mlflow.db")
    try:
        local = {k: mlflow.artifacts.download_artifacts(u, dst_path=str(tmp_path / k))
                 for k, u in uris.items()}
    finally:
        mlflow.set_tracking_uri(None)
    for path in local.values():
        flavor = mlflow.models.Model.load(path).flavors["python_function"]
        assert flavor["code"] == "code"
        for rel in ("model/__init__.py", "model/network.py", "components/common/storage.py",
                    "components/register/request.py", "components/index/run.py"):
            assert os.path.isfile(os.path.join(path, "code", rel)), rel
        with open(os.path.join(path, "requirements.txt")) as f:
            reqs = f.read()
        assert "notellm2" not in reqs
        for dist in ("torch==", "transformers==", "pillow==", "numpy==", "pandas=="):
            assert dist in reqs, (dist, reqs)
        assert os.path.isfile(os.path.join(path, "serving_input_example.json"))
    with open(os.path.join(local["related"], "requirements.txt")) as f:
        assert "faiss-cpu==" in f.read()

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", "-c", FRESH_LOAD, json.dumps(local)], env=env,
                          cwd=str(cwd), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key, path in local.items():
        code = os.path.realpath(os.path.join(path, "code")) + os.sep
        assert all(os.path.realpath(f).startswith(code) for f in out[key]["files"]), out[key]
    assert np.asarray(out["model"]["prediction"]).shape == (1, 64)
    assert len(out["related"]["prediction"][0]) == 2


def _wait_ready(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{f.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    with open(log_path) as f:
        pytest.fail(f"no answer on {url} after {timeout:.0f} s:\n{f.read()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """End the server's process group (the CLI and the scoring server it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _serve(model_uri: str, env: dict, cwd: str, log_path: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    with open(log_path, "w") as log:
        # its own session: the scoring server runs as a child of the CLI and goes with it
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def _invoke(port: int, frame, params: dict | None = None):
    body = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def test_served_models_answer_vectors_and_related_notes(pipeline_work, demo_dir, tmp_path):
    """One test, both servers started at once (a server start costs 20-40 s on 2 cores): the
    encoder answers the embed step's vectors, the related-notes model a direct FAISS search's
    top K, for note ids and for a new note sent by its fields."""
    from components.common.readers import read_dataset
    from components.embed.run import read_vectors
    from components.index.run import load_index, search

    test = read_dataset(demo_dir).notes["test"].head(4)
    assert test["image_uri"].map(bool).any(), "no test note with an image"

    def b64(uri):  # the image's bytes, base64 as MLflow takes a binary column; "" = none
        return base64.b64encode(open(uri, "rb").read()).decode() if uri else ""

    rows = test.assign(topics=test["topics"].map(",".join), image=test["image_uri"].map(b64))[
        ["title", "content", "topics", "image"]]

    # the CLI execs `uvicorn` from PATH: put this environment's scripts first, as activating it
    # would (the tests may run with the venv's python without an activated venv). No
    # PYTHONPATH: the models bring their own code.
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTELLM2_SERVING_IMAGE_PREFIXES", "PYTHONPATH")}
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{pipeline_work}/mlflow.db",
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    related_uri = _version(pipeline_work).tags["related_model_uri"]
    servers = {}
    try:
        for key, uri in (("model", MODEL_URI), ("related", related_uri)):
            servers[key] = (*_serve(uri, env, str(tmp_path), str(tmp_path / f"{key}.log")),
                            str(tmp_path / f"{key}.log"))
        for proc, port, log_path in servers.values():
            _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log_path)
        port, related_port = servers["model"][1], servers["related"][1]

        with _invoke(port, rows) as r:
            served = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
        # a path on the server's disk: not read (no NOTELLM2_SERVING_IMAGE_PREFIXES set)
        uri = next(u for u in test["image_uri"] if u)
        with pytest.raises(urllib.error.HTTPError) as refused:
            _invoke(port, rows.drop(columns="image").head(1).assign(image_uri=uri))
        assert refused.value.code == 400
        assert "NOTELLM2_SERVING_IMAGE_PREFIXES" in refused.value.read().decode()

        k = 5
        by_id = test[["note_id"]].assign(title="", content="", topics="", image="")
        new_note = rows.head(1).assign(note_id="")  # the first test note, sent as a new note
        with _invoke(related_port, pd.concat([by_id, new_note[by_id.columns]]),
                     {"k": k}) as r:
            related = json.loads(r.read())["predictions"]
        with pytest.raises(urllib.error.HTTPError) as unknown:
            _invoke(related_port, by_id.head(1).assign(note_id="no-such-note"))
        assert unknown.value.code == 400 and "no-such-note" in unknown.value.read().decode()
    finally:
        for proc, _, _ in servers.values():
            _stop(proc)

    table, vectors = read_vectors(os.path.join(pipeline_work, "embeddings", "notes.parquet"))
    row_of = {n: i for i, n in enumerate(table["note_id"])}
    expected = vectors[[row_of[n] for n in test["note_id"]]]
    assert served.shape == expected.shape and served.shape[1] > 0
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

    # the same queries straight through the run's FAISS index
    index, ids, _ = load_index(os.path.join(pipeline_work, "index"))
    scores, found = search(index, np.vstack([expected, expected[:1]]), k + 1)
    assert len(related) == len(test) + 1
    for i, answer in enumerate(related):
        own = test["note_id"].iloc[i] if i < len(test) else None  # the new note keeps itself
        want = [(ids[p], s) for p, s in zip(found[i], scores[i], strict=True)
                if p >= 0 and ids[p] != own][:k]
        assert answer["note_id"] == (own or "")
        np.testing.assert_allclose(answer["scores"], [s for _, s in want], atol=1e-5)
        if own:  # the indexed vector itself: the very same search
            assert answer["related_ids"] == [n for n, _ in want], (i, answer)
        else:  # embedded again by the server: equal to 1e-5, so near-ties may swap
            assert set(answer["related_ids"]) == {n for n, _ in want}, (i, answer)
    assert related[-1]["related_ids"][0] == test["note_id"].iloc[0]  # itself, first
