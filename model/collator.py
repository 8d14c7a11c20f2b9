"""Batches of notes -> tensors the model takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.prompts import NoteInput

PROBES = ("text_only", "image_only")


def apply_probe(note: NoteInput, probe: str | None) -> NoteInput:
    """Modality probes: ``text_only`` drops the image (zero pixels), ``image_only`` the text."""
    if probe is None:
        return note
    if probe == "text_only":
        return NoteInput(note.title, note.content, note.topics, None)
    if probe == "image_only":
        return NoteInput("", "", (), note.image)
    raise ValueError(f"unknown probe {probe!r}; expected one of {', '.join(PROBES)}")


class NoteCollator:
    """Pads token ids and preprocesses images. A missing image becomes zeros, which is also
    what the ``text_only`` probe feeds."""

    def __init__(self, model):
        self.prompts = model.prompts
        self.tokenizer = model.tokenizer
        self.processor = model.image_processor
        self.pixel_shape = model.pixel_shape  # (3, H, W): the tower's own geometry
        self.with_images = model.vision is not None

    def token_ids(self, notes: Sequence[NoteInput]) -> list[list[int]]:
        return self.prompts.encode(list(notes))

    def __call__(self, notes: Sequence[NoteInput], ids: list[list[int]] | None = None,
                 pixel_values: torch.Tensor | None = None) -> dict:
        """Token ids padded to the longest note; ``pixel_values`` (B, 3, S, S) when the caller
        already has them (a training-time cache), else computed from ``note.image``."""
        ids = ids if ids is not None else self.token_ids(notes)
        T = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(T - len(x), T) if left else slice(0, len(x))
            input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.with_images:
            batch["pixel_values"] = (pixel_values if pixel_values is not None
                                     else self.pixels([n.image for n in notes]))
        return batch

    def pixels(self, images: list) -> torch.Tensor:
        """(B, 3, H, W) as the tower's processor makes them; zeros where a note has no image."""
        out = torch.zeros((len(images), *self.pixel_shape), dtype=torch.float32)
        present = [i for i, im in enumerate(images) if im is not None]
        if present:
            rgb = [images[i].convert("RGB") for i in present]
            px = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
            out[present] = px.float()
        return out
