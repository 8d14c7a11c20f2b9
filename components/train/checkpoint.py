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

Every rank writes into ``.tmp-step-XXXXXXXX``; once all have finished, rank 0 renames it and
writes the marker (on GCS, which has no rename, each node uploads its staging folder and rank 0
writes the marker after the uploads). Resume takes the newest folder with the marker and ignores
the rest; the newest ``keep`` complete folders are kept.

The root defaults to ``<parent of the model output>/checkpoints``: in KFP that is the train
task's own output folder, which a retried task sees again, so it continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from components.common import storage

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
        _write_durably(storage.join(final, MARKER),
                       json.dumps({"step": step, "time": time.time(), **summary}, indent=1))
        return final

    def prune(self) -> list[str]:
        """(rank 0, between saves) Remove all but the newest ``keep`` complete checkpoints, and
        every partial folder. Returns what it removed."""
        complete = self.complete_steps()
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
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
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


def _write_durably(uri: str, text: str) -> None:
    if storage.is_gcs(uri):
        storage.write_text(uri, text)
        return
    with open(uri, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
