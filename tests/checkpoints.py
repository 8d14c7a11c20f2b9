"""Checkpoint folders shaped like the ones users bring, written locally: real transformers
configs and file formats (``config.json`` + ``model.safetensors``, ``tokenizer.json`` +
``tokenizer_config.json``, ``preprocessor_config.json``), random weights, toy widths.

What is real about them is what breaks a pipeline: the stored dtype, the tokenizer family (BOS,
pad, padding side), spare embedding rows, the tower's own image size, patch size and CLS token.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import torch

CORPUS = [
    'Note: {"title": "Pumpkin doll", "topic": "Toys", "content": "Perfect for Halloween"}',
    "fluffy bunny at the lake, spicy noodles near town, vintage jacket sale",
    "compress this note into one word: 火锅 笔记 将该笔记压缩为一个词",
    "the quick brown fox jumps over the lazy dog 0123456789 #topic[话题]#",
] * 25


def _bpe(corpus, vocab_size: int, *, pre_tokenizer, specials: list[str], byte_tokens: bool):
    """Vocabulary and merges of a BPE trained on ``corpus`` with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if not byte_tokens else []
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=alphabet))
    model = json.loads(tok.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    if byte_tokens:  # SentencePiece's byte fallback: <0x00> .. <0xFF> right after the specials
        ordered = specials + [f"<0x{b:02X}>" for b in range(256)]
        ordered += [t for t in sorted(vocab, key=vocab.get) if t not in ordered]
        vocab = {t: i for i, t in enumerate(ordered)}
    return vocab, merges


def llama2_tokenizer(path: str):
    """A Llama-2 / Mistral family tokenizer: SentencePiece-style BPE (``▁``, byte fallback),
    BOS ``<s>`` added to every sequence, no pad token, left padding (``LlamaTokenizer``)."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    vocab, merges = _bpe(CORPUS, 700, specials=["<unk>", "<s>", "</s>"], byte_tokens=True,
                         pre_tokenizer=pre_tokenizers.Metaspace(replacement="▁", split=False))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    assert tok.pad_token is None and tok("a")["input_ids"][0] == tok.bos_token_id
    tok.save_pretrained(path)
    return tok


def llama3_tokenizer(path: str):
    """A Llama-3 family tokenizer: byte-level BPE, ``<|begin_of_text|>`` added by a template
    post-processor, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    vocab, merges = _bpe(CORPUS, 600, specials=specials, byte_tokens=False,
                         pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    fast.save_pretrained(path)
    return fast


def qwen2_tokenizer(path: str):
    """A Qwen2 family tokenizer: byte-level BPE, no BOS, pad = ``<|endoftext|>``."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe(CORPUS, 600, specials=["<|endoftext|>"], byte_tokens=False,
                         pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(path)
    return tok


def _save(model, path: str, dtype: torch.dtype) -> str:
    model.to(dtype).save_pretrained(path)
    return path


def llama_checkpoint(path: str, *, dtype=torch.bfloat16, tokenizer: str = "llama2",
                     hidden: int = 64, layers: int = 2, intermediate: int | None = None,
                     vocab_size: int | None = None) -> str:
    """``LlamaForCausalLM`` (an LM head, grouped-query attention) stored in ``dtype`` with a
    BOS-adding tokenizer; the embedding matrix as long as the tokenizer, as in Llama-2/3
    (``vocab_size`` makes it longer, for a realistic parameter count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = (llama2_tokenizer if tokenizer == "llama2" else llama3_tokenizer)(path)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden,
                      intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(1)
    return _save(LlamaForCausalLM(cfg), path, dtype)


def qwen2_checkpoint(path: str, *, dtype=torch.bfloat16, spare_rows: int = 64,
                     hidden: int = 64, layers: int = 2) -> str:
    """``Qwen2ForCausalLM`` with tied embeddings whose matrix has ``spare_rows`` rows beyond the
    tokenizer (Qwen2.5-0.5B: 151,936 rows for 151,665 tokens); the spare rows hold values far
    from the trained ones, as untrained padding rows do."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen2_tokenizer(path)
    cfg = Qwen2Config(vocab_size=len(tok) + spare_rows, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tok):] = 5.0
    return _save(model, path, dtype)


def siglip_checkpoint(path: str, *, image_size: int = 384, patch_size: int = 16,
                      hidden: int = 32, layers: int = 2, dtype=torch.float32) -> str:
    """A SigLIP vision tower at its own resolution (no CLS token; an attention-pooling head),
    with its image processor (``size`` height x width, mean/std 0.5)."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4,
                             image_size=image_size, patch_size=patch_size)
    torch.manual_seed(3)
    _save(SiglipVisionModel(cfg), path, dtype)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def clip_checkpoint(path: str, *, image_size: int = 224, patch_size: int = 32,
                    hidden: int = 32, layers: int = 2, full: bool = True,
                    dtype=torch.float32) -> str:
    """A CLIP checkpoint (the whole ``CLIPModel``, text tower included, as the hub publishes
    ``openai/clip-vit-*``; ``full=False`` saves the vision tower alone) with its processor
    (resize the shortest edge, centre crop)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(4)
    if full:
        cfg = CLIPConfig(text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          vocab_size=100, bos_token_id=0, eos_token_id=1,
                                          pad_token_id=1),
                         vision_config=vision, projection_dim=hidden)
        model = CLIPModel(cfg)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    _save(model, path, dtype)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}
                          ).save_pretrained(path)
    return path


def stored_dtype(path: str) -> str:
    """The dtype the folder's weights are stored in, read from the safetensors header."""
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}.pop()
