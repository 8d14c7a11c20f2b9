"""Tokenizer set-up: the placeholder tokens, a pad token, and a tiny tokenizer trained locally."""

from __future__ import annotations

from collections.abc import Iterable

from model.prompts import EOS, IMG, IMG_EMB, PAD, TEMPLATES


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts`` (and the prompt templates), so the tiny
    preset needs no hub download. Returns a ``PreTrainedTokenizerFast`` with the placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, IMG, IMG_EMB], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    fixed = [s for t in TEMPLATES.values() for s in (t.image_note, t.open, t.close)]
    tok.train_from_iterator(_chain(fixed, texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.add_special_tokens({"additional_special_tokens": [IMG, IMG_EMB]})
    fast.padding_side = "right"
    return fast


def _chain(fixed: list[str], texts: Iterable[str]):
    for _ in range(50):  # weight the template so its words become single tokens
        yield from fixed
    yield from texts


def add_placeholder_tokens(tokenizer) -> list[int]:
    """Add ``<IMG>``/``<IMG_EMB>``, and a pad token where the tokenizer has none (Llama-2/3,
    Mistral): its EOS when it has one (every pad position is masked, so any id serves), else a
    new ``<pad>``. Returns the ids that are new to the vocabulary; their embedding rows must be
    initialised (:func:`init_new_rows`)."""
    before = set(tokenizer.get_vocab())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMG, IMG_EMB]},
                                 replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in set(vocab) - before)


def init_new_rows(llm, new_ids: list[int], trained_rows: int) -> None:
    """Give the new tokens an embedding row each, at the mean of the ``trained_rows`` first rows.

    The matrix grows when a new id lies past its end (Llama: as many rows as tokens). A new id
    can also fall on a row that exists but was never trained: Qwen2's matrix has spare rows
    past its tokenizer (151,936 rows for 151,665 tokens), which hold arbitrary values; those rows
    are reset too, so ``<IMG_EMB>`` starts from the mean in every case. Under DeepSpeed ZeRO-3
    the matrix is partitioned: it is gathered, written by rank 0 and partitioned again.
    """
    import torch

    if not new_ids:
        return
    rows = llm.get_input_embeddings().weight
    total = getattr(rows, "ds_shape", rows.shape)[0]
    if max(new_ids) >= total:
        # transformers gathers a ZeRO-3 matrix itself while it resizes
        llm.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        rows = llm.get_input_embeddings().weight
    with _gathered(rows), torch.no_grad():
        mean = rows[: min(trained_rows, total)].float().mean(dim=0)
        rows[torch.tensor(new_ids)] = mean.to(rows.dtype)


def _gathered(param):
    """The whole of ``param`` inside the block when DeepSpeed ZeRO-3 partitions it (rank 0's
    writes are kept and partitioned again on exit); nothing to do otherwise. DeepSpeed is
    imported only then, as transformers does for the same reason."""
    from contextlib import nullcontext

    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
