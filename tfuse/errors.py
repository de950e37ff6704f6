"""Errors that the CLI reports as one clear message (no traceback) and a non-zero exit, and the
one that names the closest known keys."""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping

SEE = "(see the README's config groups)"


class TfuseError(Exception):
    """A user-facing error: the message names the file, key or layer and says how to fix it."""


def unknown_key(key: str, known: Iterable[str], what: str = "key") -> TfuseError:
    """``unknown key 'fusion.regg'; did you mean fusion.reg?``: the closest known ones, else the
    known ones beside it."""
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    if close:
        hint = f"did you mean {close[0]}?" + (f" (or {', '.join(close[1:])})" if close[1:] else "")
    else:
        parent = key.rpartition(".")[0]
        beside = [k for k in known if k.rpartition(".")[0] == parent]
        hint = f"known{f' under {parent}' if parent else ''}: {', '.join(beside)}"
    return TfuseError(f"unknown {what} {key!r}; {hint} {SEE}")


def check_fusion_keys(fusion: Mapping, known: Iterable[str]) -> None:
    """A ``fusion`` key outside ``known`` (``+fusion.regg=0.1`` appends one) as one line naming the
    closest known settings."""
    known = set(known)
    unknown = sorted(set(fusion) - known)
    if unknown:
        err = unknown_key(f"fusion.{unknown[0]}", [f"fusion.{k}" for k in known])
        more = f" (also unknown: {', '.join(f'fusion.{k}' for k in unknown[1:])})" if unknown[1:] else ""
        raise TfuseError(f"{err}{more}")
