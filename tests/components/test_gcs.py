"""GCS paths against a real gcp-storage-emulator server started on loopback."""

import hashlib
import os
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest

from components.common import storage
from components.common.notes import load_image
from components.common.readers import read_dataset, write_canonical
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", "notes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("gcp-storage-emulator did not start")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    storage.reset_client()
    yield "gs://notes"
    proc.terminate()
    proc.wait(timeout=10)
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    storage.reset_client()


def test_official_layout_round_trip_through_gcs(gcs, official_dir, tmp_path):
    remote = storage.join(gcs, "run1", "data")
    storage.upload_dir(official_dir, remote)
    assert storage.is_dir(remote)
    assert "notes_train.csv" in storage.list_files(remote)

    local, cloud = read_dataset(official_dir), read_dataset(remote)
    assert cloud.layout == "official"
    for split in ("train", "test"):
        a, b = local.notes[split], cloud.notes[split]
        assert a["note_id"].tolist() == b["note_id"].tolist()
        assert a["content"].tolist() == b["content"].tolist()
        assert [u.replace(official_dir, remote) for u in a["image_uri"]] == b["image_uri"].tolist()
    first = cloud.notes["train"]["image_uri"].iloc[0]
    assert first.startswith("gs://notes/run1/data/images/")
    assert load_image(first).size == (40, 30)

    canon = storage.join(gcs, "run1", "canonical")
    write_canonical(cloud, canon)
    back = read_dataset(canon)
    assert back.layout == "canonical"
    assert back.notes["test"]["note_id"].tolist() == ["t1", "t2", "t3"]

    dest = tmp_path / "down"
    storage.download_dir(canon, str(dest))
    assert (dest / "manifest.json").exists()
    assert not storage.exists(storage.join(gcs, "run1", "nothing-here"))


def _peak_bytes(fn) -> int:
    """Peak Python-allocated bytes (tracemalloc) while ``fn()`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def test_copies_stream_in_bounded_memory(gcs, tmp_path, monkeypatch):
    # parts of 1 MiB; the file is over the client's 8 MiB one-request limit
    monkeypatch.setattr(storage, "CHUNK", 2**20)
    size = 24 * 2**20
    src = str(tmp_path / "big.bin")
    with open(src, "wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))
    want = _digest(src)
    up, moved = storage.join(gcs, "big", "a.bin"), storage.join(gcs, "big2", "b.bin")
    back, local = str(tmp_path / "back" / "c.bin"), str(tmp_path / "d.bin")
    copies = [(src, up), (up, moved), (moved, back), (back, local)]  # local->gs->gs->local->local
    small = str(tmp_path / "small.bin")
    with open(small, "wb") as f:
        f.write(os.urandom(9 * 2**20))  # a resumable upload too
    for a, b in [(small, up), *copies[1:]]:  # first the client's lazy imports, outside the count
        storage.copy(a, b)
    for a, b in copies:
        peak = _peak_bytes(lambda a=a, b=b: storage.copy(a, b))
        assert peak < size / 4, f"{a} -> {b} held {peak} bytes of a {size}-byte file"
    assert _digest(back) == _digest(local) == want

    def through_local_copy():
        with storage.local_copy(moved) as path:
            assert _digest(path) == want

    assert _peak_bytes(through_local_copy) < size / 4
    assert storage.list_files(storage.join(gcs, "big")) == ["a.bin"]


def test_index_saved_to_and_loaded_from_gcs(gcs):
    import faiss
    import numpy as np

    from components.index.run import load_index, save_index

    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    ids = [f"n{i}" for i in range(300)]
    where = storage.join(gcs, "run1", "index")
    meta = save_index(index, ids, {"factory": "Flat"}, where)
    assert meta["index_bytes"] == len(faiss.serialize_index(index))
    loaded, loaded_ids, loaded_meta = load_index(where)
    assert loaded_ids == ids and loaded_meta == meta
    assert loaded.search(vectors[:5], 1)[1].ravel().tolist() == [0, 1, 2, 3, 4]
