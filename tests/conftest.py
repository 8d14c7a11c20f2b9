"""Shared fixtures. Data sets are written by the tests themselves, in the official layout."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@contextlib.contextmanager
def mlflow_server(root) -> Iterator[str]:
    """A real ``mlflow server`` on loopback (SQLite store, artifacts under ``root``); yields
    its URI and stops it afterwards."""
    os.makedirs(root, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", os.path.join(str(root), "artifacts"), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def free_port() -> int:
    """A TCP port free on loopback now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(color=(200, 30, 30), fmt="WEBP", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_official(root: str) -> str:
    """A small official-layout folder with the quirks of the real one: headerless rows,
    multi-line quoted content with inline topic tags, an unquoted comma, images without an
    extension in three formats, one with an extension, no trailing newline."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "images_test"), exist_ok=True)
    train = [
        ["a1", "Pumpkin doll", "Perfect for Halloween 🎃\nthree photos\n#CottonDoll[话题]# "
         "#Halloween[话题]# ", "img_a1", "Hobbies@Toys@"],
        ["a2", "Well-behaved", "taken by the owner #CottonDoll[话题]#", "img_a2", "Hobbies@Toys@"],
        ["a3", "Bunny", "no blush is cute too", "img_a3.png", "Pets@Daily@"],
        ["a4", "Free shipping", "take it all", "img_a4", ""],
    ]
    test = [["t1", "Chat", "#Chat[话题]# hello", "img_t1", "Emotion@Other@"],
            ["t2", "Casual chats?", "#BackandForth[话题]# ", "img_t2", "Emotion@Other@"],
            ["t3", "Third", "more words", "img_t3", "Emotion@Other@"]]
    images = {"images/img_a1": ("WEBP", (250, 0, 0)), "images/img_a2": ("JPEG", (0, 250, 0)),
              "images/img_a3.png": ("PNG", (0, 0, 250)), "images/img_a4": ("WEBP", (9, 9, 9)),
              "images_test/img_t1": ("JPEG", (90, 0, 0)), "images_test/img_t2": ("PNG", (0, 90, 0)),
              "images_test/img_t3": ("WEBP", (0, 0, 90))}
    for rel, (fmt, color) in images.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(image_bytes(color, fmt))

    def write(name, rows, trailing_newline=True):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        text = buf.getvalue() if trailing_newline else buf.getvalue().rstrip("\n")
        with open(os.path.join(root, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)

    write("notes_train.csv", train, trailing_newline=False)
    with open(os.path.join(root, "notes_train.csv"), "a", encoding="utf-8") as f:
        f.write("\na5,Keep working, free shipping, for $100!,img_a4,Hobbies@Toys@")  # 6 fields
    write("notes_test.csv", test)
    write("note_pairs_train.csv", [["a1", "a2"], ["a3", "a4"]], trailing_newline=False)
    write("note_pairs_val.csv", [["a3", "a1"], []])
    write("note_pairs_test.csv", [["t1", "t2"]])
    write("note_pairs_test_shortquery.csv", [["t1", "t2"]])
    return root


def assert_tracked_run(client, version, metrics: dict) -> None:
    """The MLflow side of a finished pipeline run, read through ``client`` (a SQLite store or a
    real server): the exit handler closed the run, it carries the commit and its data sets, and
    the registered logged model holds the evaluation."""
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kfp_final_state"] == "SUCCEEDED"
    if run.data.tags["git_sha"] != "unknown":
        assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_sha"]
    assert {"notes_train", "notes_test", "pairs_test"} <= {
        d.dataset.name for d in run.inputs.dataset_inputs}
    linked = {m.key: m.value for m in client.get_logged_model(
        version.source.removeprefix("models:/")).metrics}
    assert linked["R_at_10"] == pytest.approx(metrics["R@10"])


def serving_request(notes):
    """A request for the registered pyfunc from canonical notes: the fields, topics joined,
    and each image's bytes (the server reads no paths)."""
    def read(uri):
        if not uri:
            return b""
        with open(uri, "rb") as f:
            return f.read()

    return notes.assign(topics=notes["topics"].map(",".join),
                        image=notes["image_uri"].map(read))[["title", "content", "topics",
                                                              "image"]]


@pytest.fixture
def official_dir(tmp_path) -> str:
    return write_official(str(tmp_path / "official"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    from pipelines.demo_data import make_demo_data

    out = str(tmp_path_factory.mktemp("demo") / "data")
    make_demo_data(out, notes=120, seed=3)
    return out


# the test demo holds ~20 test queries: below the production evidence floor
PIPELINE_FAST = ("train.max_steps=15", "train.batch_pairs=8", "train.val_every=10",
                 "register.min_eval_queries=5")


@pytest.fixture(scope="session")
def demo_pipeline(demo_dir, tmp_path_factory):
    """One ``run_local`` of the demo data with its MLflow store in the work folder, shared by
    the tests that only read what it left (a pipeline run costs over a minute on 2 cores).
    Returns (work folder, the run's result)."""
    from pipelines.local import run_local

    work = str(tmp_path_factory.mktemp("pipeline") / "work")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        res = run_local(demo_dir, work, overrides=PIPELINE_FAST)
    return work, res
