"""Checkpoint folders that a killed run cannot leave half-written.

Layout under the checkpoint root (a local folder or ``gs://`` prefix)::

    step-00000500/
        ds/                      DeepSpeed's files: module, ZeRO optimizer shards, scheduler
        trainer_state.json       step, epoch, sampler position, config fingerprint, metrics
        rng-rank-00000.json ...  python / numpy / torch RNG states, one file per rank
        COMPLETE                 written last: only folders that have it count
    best-model/                  train.export=best: the weights of the lowest validation loss
        ... save_pretrained files
        COMPLETE                 step and validation loss; written last
    nonfinite-step-00000731.json a diagnostic, when a loss turned NaN / inf

Every rank writes into ``.tmp-step-XXXXXXXX``; once all have finished, each node's first rank
flushes the folder to disk (``fsync`` of every file and folder, :meth:`CheckpointStore.sync`),
rank 0 renames it, flushes the rename, and writes the marker atomically (temporary name, fsync,
rename, fsync of the folder), so a power cut cannot leave a marker in front of shards that never
reached the disk. On GCS, which has no rename and no fsync, each node uploads its staging folder
and rank 0 writes the marker after every upload has returned: an object GCS acknowledged is
durable and read back whole, so the order of the writes is all that matters there. The marker
lists every file of the checkpoint with its size.

Resume takes the newest folder with the marker and ignores the rest; the newest ``keep`` complete
folders are kept. A complete checkpoint that does not load (a file missing or of another size
than the marker says, a shard that does not unpickle: :meth:`CheckpointStore.check`,
:func:`probe`) is passed over for the next older one, with a warning; it is removed once the
resumed run has published a newer checkpoint of its own (:meth:`CheckpointStore.prune`). A bit
flipped inside a tensor's data is not detected: that would need a checksum of every shard at
every save.

A checkpoint belongs to one configuration and one training data set: ``trainer_state.json``
holds the fingerprint of both (:func:`data_fingerprint` for the data), and a run whose fingerprint
differs refuses the folder instead of resuming it (the worker's ``CheckpointMismatch``).

The root defaults to ``<parent of the model output>/checkpoints``: in KFP that is the train
task's own output folder, which a retried task sees again, so it continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time

import numpy as np
import pandas as pd

from components.common import storage

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
DS_TAG = "ds"
STATE = "trainer_state.json"
BEST = "best-model"
_STEP = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def default_root(model_out: str, checkpoint_dir: str = "") -> str:
    if checkpoint_dir:
        return checkpoint_dir
    if storage.is_gcs(model_out):
        return storage.join(model_out.rstrip("/").rsplit("/", 1)[0], "checkpoints")
    return os.path.join(os.path.dirname(os.path.abspath(model_out.rstrip("/"))), "checkpoints")


class CheckpointStore:
    """The checkpoint root of one training run. Methods say which rank calls them; the worker
    puts the barriers between them."""

    def __init__(self, root: str, keep: int = 2):
        self.root, self.keep = root, max(1, keep)
        self.remote = storage.is_gcs(root)
        # where ranks write before a checkpoint is published: the root itself, or for GCS a
        # per-node local folder named after the root
        self.local = (os.path.join(tempfile.gettempdir(), "notellm2-ckpt-"
                                   + hashlib.sha1(root.encode()).hexdigest()[:12])
                      if self.remote else root)

    # -- reading ----------------------------------------------------------------------------

    def _names(self) -> list[str]:
        if not self.remote:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        bucket, blob = storage._split(self.root)
        prefix = blob.rstrip("/") + "/" if blob else ""
        pages = storage._client().list_blobs(bucket, prefix=prefix, delimiter="/")
        files = [b.name[len(prefix):] for b in pages]  # consumes the pages, fills .prefixes
        return sorted({p[len(prefix):].rstrip("/") for p in pages.prefixes} | set(files))

    def path(self, step: int) -> str:
        return storage.join(self.root, step_name(step))

    def is_complete(self, step: int) -> bool:
        return storage.exists(storage.join(self.path(step), MARKER))

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first; partial folders are not listed."""
        steps = [int(m.group(1)) for n in self._names() if (m := _STEP.match(n))]
        return sorted(s for s in steps if self.is_complete(s))

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def read_state(self, step: int) -> dict:
        return json.loads(storage.read_text(storage.join(self.path(step), STATE)))

    def check(self, step: int) -> str | None:
        """(rank 0) What is wrong with complete checkpoint ``step`` on its storage, or None: a
        marker or trainer state that does not parse, a file the marker lists that is missing or
        of another size. Markers of older versions list no files; only their state is read."""
        try:
            marker = json.loads(storage.read_text(storage.join(self.path(step), MARKER)))
            self.read_state(step)
        except Exception as e:  # noqa: BLE001 -- a missing file, bad JSON, a GCS NotFound
            return f"{type(e).__name__}: {e}"
        want = marker.get("files")
        if not want:
            return None
        have = _sizes(self.path(step))
        for rel, size in sorted(want.items()):
            if rel not in have:
                return f"{rel} is missing"
            if have[rel] != size:
                return f"{rel} holds {have[rel]} bytes, {size} were written"
        return None

    def local_copy(self, step: int, *, download: bool) -> str:
        """A local folder holding checkpoint ``step``. With GCS, the caller whose ``download``
        is true (one rank per node) fetches it; the others wait at a barrier, then read it."""
        if not self.remote:
            return self.path(step)
        dest = os.path.join(self.local, step_name(step))
        if download:
            shutil.rmtree(dest, ignore_errors=True)
            storage.download_dir(self.path(step), dest)
        return dest

    # -- writing ----------------------------------------------------------------------------

    def staging(self, step: int) -> str:
        return os.path.join(self.local, ".tmp-" + step_name(step))

    def prepare(self, step: int) -> str:
        """(one rank per node) An empty staging folder for ``step``; a stale one is removed."""
        tmp = self.staging(step)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
        return tmp

    def sync(self, step: int) -> None:
        """(one rank per node, after every rank has written) Flush the staging folder's files
        and folders to disk before anything marks them complete. On GCS the staging folder is a
        local scratch copy that is uploaded, not kept: nothing to flush."""
        if not self.remote:
            _fsync_tree(self.staging(step))

    def upload(self, step: int) -> None:
        """(GCS: one rank per node, after every rank has written) Copy the node's staging folder
        to the bucket."""
        if self.remote:
            storage.upload_dir(self.staging(step), self.path(step))
            shutil.rmtree(self.staging(step), ignore_errors=True)

    def publish(self, step: int, summary: dict) -> str:
        """(rank 0, after every rank has written and uploaded) Make checkpoint ``step`` count:
        rename the staging folder, then write the marker last. Returns its path."""
        final = self.path(step)
        if not self.remote:
            if os.path.exists(final):  # a partial folder of an earlier attempt
                shutil.rmtree(final)
            os.replace(self.staging(step), final)
            _fsync_dir(self.root)  # the rename itself, before the marker may follow it
        _write_durably(storage.join(final, MARKER),
                       json.dumps({"step": step, "time": time.time(), **summary,
                                   "files": _sizes(final)}, indent=1))
        return final

    def prune(self, current: int | None = None) -> list[str]:
        """(rank 0, between saves) Remove all but the newest ``keep`` complete checkpoints, and
        every partial folder. Returns what it removed.

        ``current`` is the step just published: complete checkpoints of later steps are left
        from a trajectory this run abandoned (it resumed from an older one because they did
        not load) and go too."""
        complete = [s for s in self.complete_steps() if current is None or s <= current]
        keep = {step_name(s) for s in complete[-self.keep:]}
        gone = [n for n in self._names()
                if (n.startswith(".tmp-step-") or _STEP.match(n)) and n not in keep]
        for name in gone:
            _remove(storage.join(self.root, name))
        return gone

    def clear(self) -> None:
        """(rank 0) Forget every checkpoint of this root (``train.resume=false``)."""
        for name in self._names():
            if name.startswith((".tmp-step-", BEST, ".tmp-" + BEST)) or _STEP.match(name):
                _remove(storage.join(self.root, name))

    # -- the best model (train.export=best) -------------------------------------------------

    def best_staging(self) -> str:
        return os.path.join(self.local, ".tmp-" + BEST)

    def publish_best(self, staging: str, summary: dict) -> str:
        """(rank 0) Replace the kept best model by the export in ``staging``: the old one loses
        its marker first, the new one gets it last, so a crash in between leaves no folder that
        claims to be complete."""
        final = storage.join(self.root, BEST)
        marker = storage.join(final, MARKER)
        if storage.exists(marker):
            _remove_file(marker)
        if self.remote:
            _remove(final)
            storage.upload_dir(staging, final)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _fsync_dir(self.root)
        _write_durably(marker, json.dumps({**summary, "time": time.time()}, indent=1))
        return final

    def fetch_best(self, dest: str) -> dict:
        """(rank 0) Copy the kept best model to ``dest`` (local or gs://, without its marker);
        returns the marker's step and validation loss."""
        final = storage.join(self.root, BEST)
        summary = json.loads(storage.read_text(storage.join(final, MARKER)))
        with tempfile.TemporaryDirectory() as tmp:
            src = final
            if self.remote:
                src = os.path.join(tmp, BEST)
                storage.download_dir(final, src)
            if storage.is_gcs(dest):
                storage.upload_dir(src, dest)
                _remove_file(storage.join(dest, MARKER))
            else:
                shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))
        return summary

    def diagnostic(self, step: int) -> str:
        return storage.join(self.root, f"nonfinite-{step_name(step)}.json")


def data_fingerprint(notes: pd.DataFrame, pairs: dict[str, pd.DataFrame | None]) -> dict:
    """What a checkpoint was trained on: the counts and one SHA-256 over the note table (ids,
    texts, topics, category and image file name, in their order: a note's key is its row) and
    the pair tables (``query_id``, ``target_id`` rows in order), hashed column-wise with
    pandas' fixed-key row hash (a second or two for a million notes). The image's folder is
    left out, so the same data set read from another place is the same data; an image replaced
    under the same name is not seen."""
    h = hashlib.sha256()

    def add(name: str, df: pd.DataFrame) -> None:
        h.update(f"{name}:{len(df)}:{','.join(df.columns)};".encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy(np.uint64).tobytes())

    cols = {"note_id": notes["note_id"].astype(str)}
    for c in ("title", "content", "category"):
        if c in notes:
            cols[c] = notes[c].fillna("").astype(str)
    if "topics" in notes:
        cols["topics"] = notes["topics"].map(lambda t: "\x1f".join(map(str, t))
                                             if t is not None else "")
    if "image_uri" in notes:
        cols["image"] = notes["image_uri"].fillna("").map(lambda u: str(u).rsplit("/", 1)[-1])
    add("notes", pd.DataFrame(cols))
    out = {"notes": len(notes)}
    for name, df in sorted(pairs.items()):
        rows = 0 if df is None else len(df)
        out[f"{name}_pairs"] = rows
        if df is not None:
            add(name, df[["query_id", "target_id"]].astype(str))
    out["sha256"] = h.hexdigest()
    return out


def probe(folder: str) -> str | None:
    """(one rank per node) What keeps the checkpoint in local ``folder`` from loading, or None:
    every ``.pt`` file is opened as torch does (memory-mapped: the zip directory and the
    pickled structure are read, not the tensors) and every ``.json`` file parsed. Run before
    the engine loads anything, so that all ranks pass over a bad checkpoint together instead
    of one rank failing inside DeepSpeed's collective load."""
    import torch

    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            try:
                if name.endswith(".pt"):
                    torch.load(path, map_location="cpu", mmap=True, weights_only=False)
                elif name.endswith(".json"):
                    with open(path) as f:
                        json.load(f)
            except Exception as e:  # noqa: BLE001 -- whatever torch.load raises on a bad file
                return f"{rel}: {type(e).__name__}: {str(e)[:300]}"
    return None


def _sizes(uri: str) -> dict[str, int]:
    """Size of every file under ``uri`` by relative path, the marker left out."""
    out = {}
    if storage.is_gcs(uri):
        bucket, blob = storage._split(uri)
        prefix = blob.rstrip("/") + "/"
        for b in storage._client().list_blobs(bucket, prefix=prefix):
            rel = b.name[len(prefix):]
            if rel and not rel.endswith("/"):
                out[rel] = int(b.size)
    else:
        for root, _, files in os.walk(uri):
            for name in files:
                path = os.path.join(root, name)
                out[os.path.relpath(path, uri).replace(os.sep, "/")] = os.path.getsize(path)
    out.pop(MARKER, None)
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync every file under ``path``, then every folder, deepest first (a file's directory
    entry is durable once its folder is). Another process's writes count too: the page cache
    belongs to the file, not to the process that wrote it."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _write_durably(uri: str, text: str) -> None:
    """Write a small file that is either absent or whole after a crash: a temporary name,
    fsync, rename, fsync of its folder. On GCS an upload is atomic and durable once it
    returns."""
    if storage.is_gcs(uri):
        storage.write_text(uri, text)
        return
    tmp = uri + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)
    _fsync_dir(os.path.dirname(os.path.abspath(uri)))


def _remove_file(uri: str) -> None:
    if storage.is_gcs(uri):
        bucket, blob = storage._split(uri)
        storage._client().bucket(bucket).blob(blob).delete()
    elif os.path.exists(uri):
        os.remove(uri)


def _remove(uri: str) -> None:
    if not storage.is_gcs(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, blob = storage._split(uri)
    client = storage._client()
    for b in client.list_blobs(bucket, prefix=blob.rstrip("/") + "/"):
        b.delete()
