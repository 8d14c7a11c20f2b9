"""The encode loop: length-sorted batches, inference mode, order restored, unit vectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from model.collator import NoteCollator, apply_probe
from model.prompts import NoteInput

TOKENIZE_CHUNK = 4096  # notes tokenised at a time before their ids are packed


def encode(model, notes: Sequence[NoteInput], *, batch_size: int = 64, probe: str | None = None,
           device: str | None = None, progress: bool = True, desc: str = "embed",
           sort_by_length: bool = True,
           pixels: Callable[[list[int]], torch.Tensor] | None = None) -> np.ndarray:
    """(N, d) float32 unit vectors (fused ``n_m``) for ``notes``, in input order.

    ``notes`` may be a lazy sequence (images decoded on access); only one batch of images is
    held at a time. Batches are formed from length-sorted notes so that little padding is
    computed; ``sort_by_length=False`` keeps input order (the benchmark's baseline).
    ``pixels(positions)``, when given, supplies the (B, 3, H, W) pixels of the notes at those
    input positions (a pixel cache's ``get``); the notes' images are then never read, and the
    ``text_only`` probe reads none at all.
    """
    if len(notes) == 0:
        return np.zeros((0, model.config.embed_dim), dtype=np.float32)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    collator = NoteCollator(model)
    # tokenise texts only (no images) to sort by length, a chunk at a time; ids kept as int32
    # arrays (a list of Python ints costs ~9x the memory: 1M notes x 96 tokens would be ~3 GB)
    ids = []
    for chunk in _chunks(_iter(notes), TOKENIZE_CHUNK):
        ids += [np.asarray(x, dtype=np.int32) for x in collator.token_ids(
            [apply_probe(NoteInput(n.title, n.content, n.topics), probe) for n in chunk])]
    order = (np.argsort([-len(x) for x in ids], kind="stable") if sort_by_length
             else np.arange(len(ids)))
    out = np.zeros((len(ids), model.config.embed_dim), dtype=np.float32)
    use_amp = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    bar = tqdm(total=len(ids), desc=desc, unit="note", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if pixels is not None and collator.with_images:
                # text_only feeds zero pixels: no image is read
                px = None if probe == "text_only" else pixels(idx.tolist())
                texts = [apply_probe(_text(notes, i), probe) for i in idx]
                batch = collator(texts, [ids[i] for i in idx], pixel_values=px)
            else:
                batch_notes = [apply_probe(notes[i], probe) for i in idx]
                batch = collator(batch_notes, [ids[i] for i in idx])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                vec = model(**batch)["n_m"]
            bad = ~torch.isfinite(vec).all(dim=-1)
            if bad.any():
                where = [int(i) for i in idx[bad.cpu().numpy()]][:5]
                raise FloatingPointError(
                    f"the model gave non-finite vectors ({int(bad.sum())} in a batch of "
                    f"{len(idx)}; notes at input positions {where}"
                    f"{', ' + probe + ' probe' if probe else ''}): its weights or inputs are "
                    "broken")
            out[idx] = vec.float().cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return out


def _text(notes: Sequence[NoteInput], i: int) -> NoteInput:
    """Note i without its image, not read (lazy sequences have ``text``)."""
    text = getattr(notes, "text", None)
    if text is not None:
        return text(i)
    n = notes[i]
    return NoteInput(n.title, n.content, n.topics)


def _chunks(items, size: int):
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _iter(notes: Sequence[NoteInput]):
    texts = getattr(notes, "texts", None)  # lazy sequences can hand out texts without images
    if texts is not None:
        yield from texts()
        return
    for i in range(len(notes)):
        yield notes[i]
