"""Rich progress bars shared by every long stage."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def make_progress(transient: bool = True) -> Progress:
    """A bar drawn only on a terminal: elsewhere (a log, a pipe) rich would leave a blank line per bar."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        transient=transient,
        disable=not get_console().is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (drawn only on a terminal, so tests and logs stay clean)."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)
