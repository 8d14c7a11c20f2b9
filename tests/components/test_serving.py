"""The registered model behind a real ``mlflow models serve``: the REST answer for a few test
notes, their images sent as bytes, equals what the pipeline's embed step wrote for them; an
``image_uri`` the server was not told it may read is refused with a 400."""

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
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow
MODEL_URI = "models:/notellm2@challenger"


@pytest.fixture(scope="module")
def pipeline_work(demo_pipeline) -> str:
    """The shared pipeline run (tests/conftest.py), its MLflow store in the work folder."""
    return demo_pipeline[0]


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


def test_served_model_returns_the_embed_step_vectors(pipeline_work, demo_dir, tmp_path):
    from components.common.readers import read_dataset
    from components.embed.run import read_vectors

    test = read_dataset(demo_dir).notes["test"].head(4)
    assert test["image_uri"].map(bool).any(), "no test note with an image"

    def b64(uri):  # the image's bytes, base64 as MLflow takes a binary column; "" = none
        return base64.b64encode(open(uri, "rb").read()).decode() if uri else ""

    rows = test.assign(topics=test["topics"].map(",".join), image=test["image_uri"].map(b64))[
        ["title", "content", "topics", "image"]]

    port = free_port()
    # the CLI execs `uvicorn` from PATH: put this environment's scripts first, as activating it
    # would (the tests may run with the venv's python without an activated venv)
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "NOTELLM2_SERVING_IMAGE_PREFIXES"}
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{pipeline_work}/mlflow.db",
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    log_path = str(tmp_path / "serve.log")
    with open(log_path, "w") as log:
        # its own session: the scoring server runs as a child of the CLI and goes with it
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI,
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log_path)
        def invoke(frame):
            body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)})
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=body.encode(),
                                         headers={"Content-Type": "application/json"})
            return urllib.request.urlopen(req, timeout=120)

        with invoke(rows) as r:
            served = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
        # a path on the server's disk: not read (no NOTELLM2_SERVING_IMAGE_PREFIXES set)
        uri = next(u for u in test["image_uri"] if u)
        with pytest.raises(urllib.error.HTTPError) as refused:
            invoke(rows.drop(columns="image").head(1).assign(image_uri=uri))
        assert refused.value.code == 400
        assert "NOTELLM2_SERVING_IMAGE_PREFIXES" in refused.value.read().decode()
    finally:
        _stop(proc)

    table, vectors = read_vectors(os.path.join(pipeline_work, "embeddings", "notes.parquet"))
    row_of = {n: i for i, n in enumerate(table["note_id"])}
    expected = vectors[[row_of[n] for n in test["note_id"]]]
    assert served.shape == expected.shape and served.shape[1] > 0
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
