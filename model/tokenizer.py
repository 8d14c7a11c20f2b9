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


def add_placeholder_tokens(tokenizer) -> int:
    """Add ``<IMG>``/``<IMG_EMB>`` (and a pad token where missing); returns how many were new."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": [IMG, IMG_EMB]},
                                         replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": PAD})
    return added


def resize_with_mean(llm, tokenizer, num_new: int) -> None:
    """Grow the input embeddings to the tokenizer and start new rows at the mean of the old."""
    import torch

    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = llm.get_input_embeddings().weight
    with torch.no_grad():
        emb[old:] = emb[:old].mean(dim=0, keepdim=True)
