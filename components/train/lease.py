"""A lease on a checkpoint root: one training job at a time writes its checkpoints.

Two jobs writing the same root (a retried task whose first TrainJob still runs, two pipeline
runs pinned to one ``train.checkpoint_dir``) would interleave their steps and prune each other's
folders. The lease is a small JSON file, ``LEASE.json``, at the root::

    {"owner": "team-a/notellm2-train-1a2b3c4d5e", "expires": 1767225600.0, "renewed": ..., ...}

* :meth:`Lease.acquire` takes a missing or expired lease, or renews one this owner holds already
  (the same owner id is the same job family, e.g. a retried KFP task); a live lease of another
  owner raises :class:`LeaseHeld`.
* :meth:`Lease.renew` (the heartbeat) pushes the expiry ``ttl_s`` ahead; it raises
  :class:`LeaseLost` when another owner has taken the lease over meanwhile.
* :meth:`Lease.release` deletes the lease if it is still this owner's.

Every change is a compare-and-swap, so two contenders never both win: on ``gs://`` with the
object's generation as precondition (``if_generation_match``), on a local folder under an
``flock`` on a sidecar lock file. Expiry is wall-clock time; ``ttl_s`` should be many renewal
intervals long so that clock skew between pods does not matter.

The lease does not delete or rename checkpoints (``CheckpointStore.clear`` leaves it alone: its
name is neither a step folder nor ``best-model``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable

from components.common import storage

LEASE_FILE = "LEASE.json"
DEFAULT_TTL_S = 600.0
# the TrainJob's pods find their owner id here (components/train/trainjob.py sets it)
OWNER_ENV = "NOTELLM2_CHECKPOINT_LEASE_OWNER"


class LeaseHeld(RuntimeError):
    """Another owner holds a live lease on the checkpoint root."""


class LeaseLost(RuntimeError):
    """This owner's lease was taken over (it expired without a renewal)."""


class _Conflict(Exception):
    """The lease changed between read and write (someone else won the race)."""


# -- compare-and-swap on one small file --------------------------------------------------------

class _GcsFile:
    """The lease object on GCS; the version is the object's generation (0: no object)."""

    def __init__(self, uri: str):
        self.uri = uri

    def _blob(self):
        return storage._bucket_blob(self.uri)

    def get(self) -> tuple[bytes | None, object]:
        from google.api_core.exceptions import NotFound

        blob = self._blob()
        try:
            blob.reload()
            gen = blob.generation
            return blob.download_as_bytes(if_generation_match=gen), gen
        except NotFound:
            return None, 0
        except Exception as e:
            if _precondition_failed(e):  # replaced between reload and download: read again
                raise _Conflict() from e
            raise

    def put(self, data: bytes, version) -> None:
        try:
            self._blob().upload_from_string(data, content_type="application/json",
                                            if_generation_match=version)
        except Exception as e:
            if _precondition_failed(e):
                raise _Conflict() from e
            raise

    def delete(self, version) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._blob().delete(if_generation_match=version)
        except NotFound:
            pass
        except Exception as e:
            if _precondition_failed(e):
                raise _Conflict() from e
            raise


def _precondition_failed(e: Exception) -> bool:
    from google.api_core.exceptions import PreconditionFailed

    return isinstance(e, PreconditionFailed) or getattr(e, "code", None) == 412


class _LocalFile:
    """The lease file in a local folder; the version is a digest of its bytes (None: no file).
    Read-compare-write happens under an exclusive ``flock`` of ``<file>.lock``."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def _version(data: bytes | None):
        return None if data is None else hashlib.sha256(data).hexdigest()

    def get(self) -> tuple[bytes | None, object]:
        with self._locked():
            data = self._read()
        return data, self._version(data)

    def put(self, data: bytes, version) -> None:
        with self._locked():
            if self._version(self._read()) != version:
                raise _Conflict()
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def delete(self, version) -> None:
        with self._locked():
            data = self._read()
            if data is None:
                return
            if self._version(data) != version:
                raise _Conflict()
            os.remove(self.path)


def _file(uri: str):
    return _GcsFile(uri) if storage.is_gcs(uri) else _LocalFile(uri)


# -- the lease ---------------------------------------------------------------------------------

class Lease:
    """``owner``'s lease on checkpoint root ``root``; see the module's docstring."""

    def __init__(self, root: str, owner: str, ttl_s: float = DEFAULT_TTL_S, *,
                 clock: Callable[[], float] | None = None):
        if not owner:
            raise ValueError("a lease needs an owner id")
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, not {ttl_s}")
        self.root, self.owner, self.ttl_s = root, owner, float(ttl_s)
        self.clock = clock or (lambda: time.time())
        self.uri = storage.join(root, LEASE_FILE)
        self._file = _file(self.uri)
        self.expires = 0.0  # of the lease as this owner last wrote it
        self.renewed = 0.0

    def read(self) -> dict | None:
        """The lease as it stands (None: nobody holds one)."""
        return self._get()[0]

    def _get(self) -> tuple[dict | None, object]:
        for _ in range(5):
            try:
                data, version = self._file.get()
            except _Conflict:
                continue
            if data is None:
                return None, version
            try:
                return json.loads(data), version
            except ValueError:  # a torn or foreign file: treat it as expired
                return {"owner": "", "expires": 0.0}, version
        raise _Conflict()

    def _record(self, now: float, acquired: float) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "acquired": acquired, "renewed": now,
                           "expires": now + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> Lease:
        """Take the lease (or renew this owner's); :class:`LeaseHeld` if another owner's is
        live."""
        for _ in range(5):
            cur, version = self._get()
            now = self.clock()
            if cur is not None and cur.get("owner") != self.owner \
                    and float(cur.get("expires", 0)) > now:
                raise LeaseHeld(
                    f"checkpoint root {self.root} is leased by {cur.get('owner')!r} (host "
                    f"{cur.get('host', '?')}) for {float(cur['expires']) - now:.0f} s more: "
                    f"another training job writes its checkpoints there. Wait for it to end, "
                    f"stop it, or train into another train.checkpoint_dir")
            acquired = (float(cur.get("acquired", now)) if cur is not None
                        and cur.get("owner") == self.owner else now)
            try:
                self._file.put(self._record(now, acquired), version)
            except _Conflict:
                continue  # somebody else wrote meanwhile: look again
            self.expires, self.renewed = now + self.ttl_s, now
            return self
        raise LeaseHeld(f"checkpoint root {self.root}: the lease keeps changing under us "
                        "(another job is taking it)")

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead; :class:`LeaseLost` if the lease is no longer ours."""
        for _ in range(5):
            cur, version = self._get()
            if cur is None or cur.get("owner") != self.owner:
                raise LeaseLost(
                    f"the lease on checkpoint root {self.root} is no longer held by "
                    f"{self.owner!r} (now: {cur.get('owner') if cur else 'nobody'!r}); "
                    "another job may be writing these checkpoints")
            now = self.clock()
            try:
                self._file.put(self._record(now, float(cur.get("acquired", now))), version)
            except _Conflict:
                continue
            self.expires, self.renewed = now + self.ttl_s, now
            return
        raise LeaseLost(f"the lease on checkpoint root {self.root} keeps changing under us")

    def maybe_renew(self, every_s: float | None = None) -> None:
        """Renew when ``every_s`` (default: a quarter of the TTL) has passed since the last
        write: a heartbeat to call from a polling loop."""
        if self.clock() - self.renewed >= (self.ttl_s / 4 if every_s is None else every_s):
            self.renew()

    def release(self) -> None:
        """Delete the lease if this owner still holds it (another owner's is left alone)."""
        for _ in range(5):
            cur, version = self._get()
            if cur is None or cur.get("owner") != self.owner:
                return
            try:
                self._file.delete(version)
                return
            except _Conflict:
                continue

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def verify(root: str, owner: str) -> None:
    """Raise :class:`LeaseLost` unless ``owner`` holds the lease on ``root``; nothing to check
    when ``owner`` is empty (no launcher took a lease). For the worker's rank 0 before it
    publishes a checkpoint."""
    if not owner:
        return
    cur = Lease(root, owner).read()
    if cur is None or cur.get("owner") != owner:
        raise LeaseLost(f"checkpoint root {root}: the lease belongs to "
                        f"{(cur or {}).get('owner', 'nobody')!r}, not {owner!r}; refusing to "
                        "write checkpoints another job may be writing too")
