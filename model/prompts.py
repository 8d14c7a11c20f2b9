"""Prompts and tokenisation of a note.

The mICL prompt puts the image in its own "note" before the text note::

    Note: {"image": "<IMG>"}, compress this note into one word: "<IMG_EMB>". Note: {"title": "…",
    "topic": "…", "content": "…"}, compress this note into one word: "

``n_v`` is read at the token right before ``<IMG_EMB>`` (by causal attention it has seen only the
image half) and ``n_m`` at the last token. The text body is truncated to the token budget first
and the compression suffix appended after, so the suffix is never cut.

``<IMG>`` stands for one image in the template; in the token sequence it is expanded to
``num_query_tokens`` copies whose embeddings the connector output replaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

IMG = "<IMG>"
IMG_EMB = "<IMG_EMB>"
PAD = "<pad>"
EOS = "<eos>"


@dataclass(frozen=True)
class Template:
    image_note: str  # the image half of mICL; ends before the text note
    open: str  # text note opening, before the JSON fields
    basic_image_field: str  # image field for the single-vector prompt
    close: str  # compression suffix, never truncated
    keys: tuple[str, str, str] = ("title", "topic", "content")
    topic_sep: str = ", "


TEMPLATES = {
    "en": Template(
        image_note='Note: {"image": "<IMG>"}, compress this note into one word: "<IMG_EMB>". ',
        open="Note: {",
        basic_image_field='"image": "<IMG>", ',
        close='}, compress this note into one word: "',
    ),
    "zh": Template(
        image_note='笔记：{"image": "<IMG>"}，将该笔记压缩为一个词："<IMG_EMB>"。',
        open="笔记：{",
        basic_image_field='"image": "<IMG>", ',
        close='}，将该笔记压缩为一个词："',
        topic_sep="，",
    ),
}


@dataclass(frozen=True)
class NoteInput:
    """One note as the model sees it. ``image`` is a PIL image or None (no image)."""

    title: str = ""
    content: str = ""
    topics: tuple[str, ...] | list[str] = ()
    image: object | None = None


def _clean(text: str | None) -> str:
    # a note that spells a placeholder token must not create an image slot
    return (text or "").replace(IMG_EMB, "").replace(IMG, "")


def note_body(note: NoteInput, *, title_max: int, content_max: int, max_topics: int,
              template: Template) -> str:
    """The JSON-ish field list of the text note, with the character limits applied."""
    k_title, k_topic, k_content = template.keys
    title = _clean(note.title)[:title_max]
    content = _clean(note.content)[:content_max]
    topics = template.topic_sep.join(_clean(t) for t in list(note.topics or ())[:max_topics])
    # json.dumps quotes and escapes; ensure_ascii=False keeps CJK text as characters
    return ", ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
                     for k, v in ((k_title, title), (k_topic, topics), (k_content, content)))


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text when asked for its special tokens:
    ``([bos], [])`` for Llama-2/3 and Mistral, ``([], [])`` for Qwen2, ``([], [eos])`` for a
    tokenizer that closes every sequence."""
    probe = "note"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


@dataclass
class PromptBuilder:
    """Turns notes into token ids for one variant.

    Tokenisation follows the reference implementation: the special tokens a tokenizer adds in
    front (BOS for Llama-family models, which never saw a sequence without it) are kept, the head
    of the prompt and the note's fields are tokenised together as one text (so SentencePiece
    tokenizers see no word boundary that is not in the text), and the compression suffix is
    tokenised on its own without special tokens and appended after truncation. Special tokens a
    tokenizer appends (an EOS) are left out: the last token must be the suffix's.
    """

    tokenizer: object
    variant: str
    language: str = "en"
    num_query_tokens: int = 16
    max_tokens: int = 140
    title_max_chars: int = 20
    content_max_chars: int = 80
    max_topics: int = 10

    def __post_init__(self) -> None:
        t = self.template = TEMPLATES[self.language]
        self.img_id = self.tokenizer.convert_tokens_to_ids(IMG)
        self.img_emb_id = self.tokenizer.convert_tokens_to_ids(IMG_EMB)
        if self.variant in ("micl", "notellm2"):
            self.head_text = t.image_note + t.open
        elif self.variant == "mllm_basic":
            self.head_text = t.open + t.basic_image_field
        else:  # text_only, late_fusion: the text prompt alone
            self.head_text = t.open
        self.prefix, _ = special_affixes(self.tokenizer)
        self.close = self._ids(t.close)
        head = self._ids(self.head_text)
        # the one <IMG> of the template becomes num_query_tokens slots; it counts as no text
        self.placeholders = head.count(self.img_id)
        self.head_tokens = len(self.prefix) + len(head) - self.placeholders
        self.text_budget = self.max_tokens - self.head_tokens - len(self.close)
        if self.text_budget < 8:
            raise ValueError(f"model.max_tokens={self.max_tokens} leaves {self.text_budget} tokens "
                             "for the note text after the prompt; raise it")

    @property
    def image_slots(self) -> int:
        return self.num_query_tokens if self.variant in ("micl", "notellm2", "mllm_basic") else 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def bodies(self, notes: list[NoteInput]) -> list[str]:
        return [note_body(n, title_max=self.title_max_chars, content_max=self.content_max_chars,
                          max_topics=self.max_topics, template=self.template) for n in notes]

    def encode(self, notes: list[NoteInput]) -> list[list[int]]:
        """Token ids per note: special prefix + head (image slots expanded) + body cut to the
        token budget + suffix."""
        texts = [self.head_text + body for body in self.bodies(notes)]
        keep = self.max_tokens - len(self.prefix) - len(self.close) + self.placeholders
        slots = [self.img_id] * self.num_query_tokens
        out = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = ids[:keep]
            if self.placeholders:
                at = ids.index(self.img_id)
                ids = ids[:at] + slots + ids[at + 1:]
            out.append(self.prefix + ids + self.close)
        return out
