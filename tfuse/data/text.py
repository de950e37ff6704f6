"""Text data: a corpus (:mod:`.corpora`), a tokenizer (:mod:`.tokenizer`), fixed-length
sequences. For BERT, a WordPiece and ``[CLS] window [SEP]``; for causal LMs (``causal``), a
byte-level BPE and ``<|endoftext|> window``.

The tokenizer is trained on the training split only (deterministic, so every parent of one
recipe gets the same one); when parents are given, their own tokenizer is used instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from tfuse.data.corpora import Document, load_corpus
from tfuse.data.tokenizer import causal_framing, train_bpe, train_tokenizer
from tfuse.errors import TfuseError


@dataclass
class Sequences:
    """Token ids (N, L) with their attention mask, and labels (N,) for classification."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: torch.Tensor) -> "Sequences":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Sequences(self.input_ids[index], self.attention_mask[index], pick(self.labels), pick(self.token_type_ids))

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[index]
        if self.labels is not None:
            out["labels"] = self.labels[index]
        return out


@dataclass
class TextData:
    train: Sequences
    val: Sequences
    test: Sequences
    tokenizer: object
    max_length: int
    label_names: list[str] = field(default_factory=list)


def token_stream(tokenizer, text: str) -> list[int]:
    """Token ids of a document, encoded paragraph by paragraph (no special tokens)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        return []
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    return [t for para in ids for t in para]


def chunk(tokenizer, ids: list[int], length: int, min_tokens: int = 8, causal: bool = False) -> list[list[int]]:
    """[CLS] window [SEP] for consecutive windows of ``length - 2`` tokens (a short last one
    kept); ``causal``: <|endoftext|> window, of ``length - 1``."""
    head, tail = ([tokenizer.bos_token_id], []) if causal else ([tokenizer.cls_token_id], [tokenizer.sep_token_id])
    body = length - len(head) - len(tail)
    out = []
    for start in range(0, len(ids), body):
        piece = ids[start:start + body]
        if len(piece) >= min_tokens:
            out.append([*head, *piece, *tail])
    return out


def pad(tokenizer, rows: list[list[int]], length: int, labels: list[int] | None = None) -> Sequences:
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return Sequences(ids, mask, torch.tensor(labels, dtype=torch.long) if labels is not None else None)


def cap(seq: Sequences, limit: int | None, seed: int) -> Sequences:
    """At most ``limit`` sequences, a seeded subset (order kept)."""
    if not limit or len(seq) <= limit:
        return seq
    keep = torch.randperm(len(seq), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return seq.subset(keep)


def sequences(tokenizer, docs: list[Document], length: int, label_names: list[str] | None = None,
              causal: bool = False) -> Sequences:
    rows, labels = [], []
    for doc in docs:
        pieces = chunk(tokenizer, token_stream(tokenizer, doc.text), length, causal=causal)
        rows += pieces
        if label_names is not None:
            labels += [label_names.index(doc.label)] * len(pieces)
    if not rows:
        raise TfuseError("a text split produced no sequences; use more text or a shorter data.max_length")
    return pad(tokenizer, rows, length, labels if label_names is not None else None)


def load_text(cfg, tokenizer=None, labelled: bool = False, causal: bool = False) -> TextData:
    """Corpus -> tokenizer (trained on the training split unless given: a WordPiece, or for
    ``causal`` LMs a byte-level BPE) -> padded sequences."""
    corpus = load_corpus(cfg)
    if tokenizer is None:
        train = train_bpe if causal else train_tokenizer
        tokenizer = train([d.text for d in corpus.train], cfg.vocab_size)
    if causal:
        causal_framing(tokenizer)
    length = cfg.max_length
    names = sorted({d.label for d in corpus.train}) if labelled else None
    if labelled and any(d.label is None for d in corpus.train):
        raise TfuseError(f"data.name={cfg.name} has no labels to classify")
    seed = cfg.seed
    splits = [sequences(tokenizer, docs, length, names, causal) for docs in (corpus.train, corpus.val, corpus.test)]
    train = cap(splits[0], cfg.get("max_train"), seed)
    val, test = (cap(s, cfg.get("max_eval"), seed + 1) for s in splits[1:])
    return TextData(train, val, test, tokenizer, length, names or [])
