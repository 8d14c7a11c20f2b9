"""Paths that may be local or ``gs://``.

Every step reads and writes through these few functions so that the same code runs on a laptop
(local folders) and in a cluster (GCS buckets). ``google-cloud-storage`` honours
``STORAGE_EMULATOR_HOST``; with it set we talk to the emulator with anonymous credentials, which is
how the tests exercise the GCS path without a cloud.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

GS = "gs://"


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GS)


def join(base: str, *parts: str) -> str:
    """Join path parts; keeps ``gs://`` URIs intact."""
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def _split(uri: str) -> tuple[str, str]:
    bucket, _, blob = uri[len(GS):].partition("/")
    if not bucket:
        raise ValueError(f"malformed GCS URI {uri!r}: expected gs://bucket/path")
    return bucket, blob


@lru_cache(maxsize=1)
def _client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"),
                              credentials=AnonymousCredentials())
    # the pipeline mounts the optional Secret `notellm2-gcs` here; without it the default
    # credentials apply (GKE Workload Identity, GOOGLE_APPLICATION_CREDENTIALS, gcloud login)
    key = os.path.join(os.environ.get("NOTELLM2_GCS_KEY_DIR", "/var/secrets/gcs"), "key.json")
    if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and os.path.isfile(key):
        return storage.Client.from_service_account_json(key)
    return storage.Client()


def reset_client() -> None:
    """Forget the cached client (after the emulator address changes, in tests)."""
    _client.cache_clear()


def _bucket_blob(uri: str):
    bucket, blob = _split(uri)
    return _client().bucket(bucket).blob(blob)


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket, blob = _split(uri)
        if _client().bucket(bucket).blob(blob).exists():
            return True
        # a "folder" exists when something lives under it
        return any(True for _ in _client().list_blobs(bucket, prefix=blob.rstrip("/") + "/",
                                                       max_results=1))
    return os.path.exists(uri)


def is_dir(uri: str) -> bool:
    if is_gcs(uri):
        bucket, blob = _split(uri)
        return any(True for _ in _client().list_blobs(bucket, prefix=blob.rstrip("/") + "/",
                                                       max_results=1))
    return os.path.isdir(uri)


def list_files(uri: str) -> list[str]:
    """Names (not paths) of the files directly inside a folder, sorted."""
    if is_gcs(uri):
        bucket, blob = _split(uri)
        prefix = blob.rstrip("/") + "/" if blob else ""
        names = set()
        for b in _client().list_blobs(bucket, prefix=prefix, delimiter="/"):
            name = b.name[len(prefix):]
            if name:
                names.add(name)
        return sorted(names)
    if not os.path.isdir(uri):
        return []
    return sorted(e.name for e in os.scandir(uri) if e.is_file())


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        return _bucket_blob(uri).download_as_bytes()
    with open(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    if is_gcs(uri):
        _bucket_blob(uri).upload_from_string(data)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    with open(uri, "wb") as f:
        f.write(data)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding the file or folder at ``uri`` (downloaded when remote)."""
    if not is_gcs(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="notellm2-") as tmp:
        dest = os.path.join(tmp, basename(uri) or "data")
        if is_dir(uri):
            download_dir(uri, dest)
        else:
            write_bytes(dest, read_bytes(uri))
        yield dest


def download_dir(uri: str, dest: str) -> None:
    bucket, blob = _split(uri)
    prefix = blob.rstrip("/") + "/"
    for b in _client().list_blobs(bucket, prefix=prefix):
        rel = b.name[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        target = Path(dest, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        b.download_to_filename(str(target))


def upload_dir(src: str, uri: str) -> None:
    """Copy a local folder to ``uri`` (a local folder or ``gs://`` prefix)."""
    if not is_gcs(uri):
        shutil.copytree(src, uri, dirs_exist_ok=True)
        return
    for root, _, files in os.walk(src):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src).replace(os.sep, "/")
            _bucket_blob(join(uri, rel)).upload_from_filename(path)
