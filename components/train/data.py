"""What the training processes read: the note table, the pairs, batches and their order.

Every rank loads the canonical folder itself; :class:`PairOrder` decides which pairs each rank
sees, so the ranks never exchange data, only gradients and embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from components.common.canonical import load_canonical
from components.common.notes import LazyNotes, PixelCache
from model.collator import NoteCollator


def note_texts(notes: pd.DataFrame) -> pd.Series:
    """Title, content and topics of each note as one string (what the tokenizer and the
    look-alike miner read)."""
    return notes["title"] + " " + notes["content"] + " " + notes["topics"].map(" ".join)


def training_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    return pairs[pairs["query_id"] != pairs["target_id"]].reset_index(drop=True)


@dataclass
class TrainData:
    notes: pd.DataFrame  # every split's notes; a note's key is its row number here
    train: pd.DataFrame  # training pairs (self-pairs dropped)
    val: pd.DataFrame | None  # held-out pairs, or None
    row_of: dict[str, int]
    train_keys: range = range(0)  # the training split's notes (keys), where negatives may come from

    @classmethod
    def load(cls, canonical_dir: str) -> TrainData:
        notes, pairs, _ = load_canonical(canonical_dir)
        allnotes = pd.concat(notes.values(), ignore_index=True)
        train = training_pairs(pairs["train"])
        if train.empty:
            raise ValueError("no training pairs left after dropping self-pairs")
        val = training_pairs(pairs["val"]) if "val" in pairs else None
        train_keys, offset = range(len(allnotes)), 0  # one split only: all notes
        for name, df in notes.items():
            if name == "train":
                train_keys = range(offset, offset + len(df))
            offset += len(df)
        return cls(allnotes, train, val if val is not None and len(val) else None,
                   {nid: i for i, nid in enumerate(allnotes["note_id"])}, train_keys)

    def look_alikes(self, pool_size: int, seed: int) -> dict[int, tuple[int, int]]:
        """One-modality look-alikes of every training pair's query note
        (:mod:`components.train.hard_negatives`), among the training split's notes (at most
        ``pool_size`` of them besides the pairs' own, a seeded sample); test notes are never
        used."""
        from components.common import storage
        from components.train.hard_negatives import mine, thumbnail

        a = [self.row_of[x] for x in self.train["query_id"]]
        b = [self.row_of[x] for x in self.train["target_id"]]
        pool = list(self.train_keys)
        if len(pool) > pool_size:
            rng = np.random.default_rng(seed)
            pool = sorted(rng.choice(pool, size=pool_size, replace=False).tolist())
        texts = note_texts(self.notes).tolist()  # one pass over the columns
        uris = self.notes["image_uri"].tolist()

        def image(k: int):
            return thumbnail(storage.read_bytes(uris[k])) if uris[k] else None

        return mine(a, b, texts.__getitem__, image, pool)

    def corpus(self) -> list[str]:
        """Texts of the training notes: the tiny tokenizer learns its vocabulary from them."""
        ids = set(self.train["query_id"]) | set(self.train["target_id"])
        rows = self.notes[self.notes["note_id"].isin(ids)]
        return note_texts(rows).tolist()

    def note_ids(self, keys: list[int]) -> list[str]:
        return [str(self.notes["note_id"].iat[k]) for k in keys]


class PairBatches(torch.utils.data.Dataset):
    """Item i = pair i as (key a, key b); keys are row numbers in the note table."""

    def __init__(self, pairs: pd.DataFrame, row_of: dict[str, int]):
        self.a = [row_of[x] for x in pairs["query_id"]]
        self.b = [row_of[x] for x in pairs["target_id"]]

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i], self.b[i]


class PairOrder(torch.utils.data.Sampler):
    """Batch sampler: this rank's micro-batches of pair indices, resumable mid-epoch.

    Epoch e is the permutation of all pairs drawn from ``seed + e`` (the same on every rank, as
    in ``DistributedSampler``), cut into global batches of ``world x batch`` pairs; rank r takes
    slice r of each. An epoch holds a whole number of optimizer steps (``multiple`` micro-batches
    each); the tail that fills no step is left out that epoch. ``set_epoch(e, start)`` resumes
    at micro-batch ``start`` of epoch e.
    """

    def __init__(self, n: int, batch: int, *, world: int = 1, rank: int = 0, seed: int = 0,
                 multiple: int = 1):
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.per_epoch = n // (batch * world) // multiple * multiple  # micro-batches per rank
        if self.per_epoch == 0:
            raise ValueError(f"{n} training pairs fill no step of {batch} pairs x {world} "
                             f"processes x {multiple} micro-batches; lower train.batch_pairs, "
                             "train.nproc or train.grad_accum")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for j in range(self.start, self.per_epoch):
            first = (j * self.world + self.rank) * self.batch
            yield perm[first:first + self.batch]


def make_collate(notes: LazyNotes, collator: NoteCollator, cache: PixelCache | None,
                 look_alikes: dict[int, tuple[int, ...]] | None = None):
    """Batches of ``[a_1..a_N, b_1..b_N]`` notes; with ``look_alikes`` the query notes'
    look-alikes follow as extra negatives, and ``n_pairs`` says where the pairs end."""

    def collate(items):
        ka, kb = zip(*items, strict=True)
        keys = list(ka) + list(kb)
        if look_alikes is not None:
            keys += [x for a in ka for x in look_alikes[a]]
        texts = [notes.text(k) for k in keys]
        pixels = None
        if collator.with_images:  # the texts carry no images: pixels come from here
            pixels = (cache.get(keys) if cache is not None
                      else collator.pixels([notes.image(k) for k in keys]))
        batch = collator(texts, pixel_values=pixels)
        batch["keys"] = torch.tensor(keys, dtype=torch.long)  # (2N [+ M],)
        if look_alikes is not None:
            batch["n_pairs"] = torch.tensor(len(ka))
        return batch

    return collate


def val_batches(n: int, batch: int) -> list[list[int]]:
    """Held-out pairs in fixed consecutive batches (the same at any world size)."""
    return [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
