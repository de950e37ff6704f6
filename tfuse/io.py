"""Writing outputs atomically: models and results never over an earlier one; reports replace theirs."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tfuse.errors import TfuseError


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via a temporary file in the same directory, then rename it over ``path``."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TfuseError(f"{path}: cannot write the report ({exc}); make {path.parent} writable.") from exc
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextmanager
def new_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only when the block succeeds.

    Refuses to replace an existing ``path``: parents and earlier results are never overwritten.
    """
    if path.exists():
        raise TfuseError(f"'{path}' already exists; tfuse never overwrites a model or a result (choose another directory)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def new_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling file that becomes ``path`` only when the block succeeds; refuses
    to replace an existing ``path``."""
    if path.exists():
        raise TfuseError(f"'{path}' already exists; tfuse never overwrites a result (choose another directory)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache entry for the block (a file beside the cache folder, in
    ``<cache>.locks/``, so the cache lists only its entries): concurrent jobs that need the entry
    make it once, the others wait and then reuse it."""
    folder = entry.parent.with_name(entry.parent.name + ".locks")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{entry.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
