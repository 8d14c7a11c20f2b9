"""Paths that may be local or ``gs://``.

Every step reads and writes through these few functions so that the same code runs on a laptop
(local folders) and in a cluster (GCS buckets). ``google-cloud-storage`` honours
``STORAGE_EMULATOR_HOST``; with it set we talk to the emulator with anonymous credentials, which is
how the tests exercise the GCS path without a cloud.

Files are copied by streaming (:func:`copy`, :func:`local_copy`, :func:`local_target`,
:func:`upload_dir`, :func:`download_dir`): a copy holds at most :data:`CHUNK` bytes of the file in
memory, whatever its size, and a ``gs://`` to ``gs://`` copy stays on the server (a rewrite).
:func:`read_bytes`/:func:`write_bytes` are for small files only (JSON, reports, thumbnails).
fsspec would only take over the local half here (``gs://`` needs gcsfs, which the image does not
ship), so this module keeps the one ``google-cloud-storage`` client it already had.
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
# bytes per request of a streamed upload: the client's default resumable part is 100 MiB held in
# memory; GCS wants a multiple of 256 KiB. Files up to 8 MiB go in one request (the client's rule).
CHUNK = 8 * 2**20


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


def _bucket_blob(uri: str, chunk_size: int | None = None):
    bucket, blob = _split(uri)
    return _client().bucket(bucket).blob(blob, chunk_size=chunk_size)


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


def copy(src: str, dst: str) -> None:
    """Copy the file ``src`` to ``dst`` (each local or ``gs://``) in bounded memory: downloads
    stream to disk, uploads go in :data:`CHUNK`-byte parts, ``gs://`` to ``gs://`` is a
    server-side rewrite and local to local is ``shutil.copyfile``."""
    if is_gcs(src) and is_gcs(dst):
        source, target = _bucket_blob(src), _bucket_blob(dst)
        token, _, _ = target.rewrite(source)
        while token is not None:  # a large object takes several rewrite calls
            token, _, _ = target.rewrite(source, token=token)
        return
    if is_gcs(dst):
        _bucket_blob(dst, CHUNK).upload_from_filename(src)
        return
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if is_gcs(src):
        _bucket_blob(src).download_to_filename(dst)  # read from the response as it arrives
    else:
        shutil.copyfile(src, dst)


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
            copy(uri, dest)
        yield dest


@contextmanager
def local_target(uri: str) -> Iterator[str]:
    """A local path to write the file ``uri`` to: ``uri`` itself when local (its folder made),
    else a temporary file uploaded by streaming when the block ends without an error."""
    if not is_gcs(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="notellm2-") as tmp:
        path = os.path.join(tmp, basename(uri) or "data")
        yield path
        copy(path, uri)


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
            copy(path, join(uri, rel))
