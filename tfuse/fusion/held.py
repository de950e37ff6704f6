"""What the repair holds between its passes over a block, within one byte budget that the fused
model's block inputs (always in memory) draw on first: the targets and the parents' block
inputs (``Held``: in memory while the budget lasts, else spilled to a temporary folder), and the
fused model's outputs of modules already final (``Kept``: in memory while the budget lasts, else
computed again)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HELD_BYTES = 320 * 2**20  # the repair's per-sample state held in memory; the rest spills


def held_bytes(device: torch.device) -> int:
    """The repair's memory budget: ``HELD_BYTES``, or on CUDA half the free memory if more."""
    if device.type != "cuda":
        return HELD_BYTES
    return max(HELD_BYTES, torch.cuda.mem_get_info(device)[0] // 2)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Held:
    """Named groups of tensors, each put once and taken once: in memory while the byte budget
    ``left`` lasts, else in a temporary folder (one safetensors file each, deleted when taken)."""

    def __init__(self, budget: int):
        self.left = budget
        self.memory: dict = {}
        self.files: dict = {}
        self.folder: tempfile.TemporaryDirectory | None = None
        self.count = 0

    def reserve(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True

    def put(self, key, tensors: dict[str, torch.Tensor]) -> None:
        size = nbytes(tensors.values())
        if self.reserve(size):
            self.memory[key] = (tensors, size)
            return
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="tfuse-repair-")
        self.count += 1
        path = os.path.join(self.folder.name, f"{self.count}.safetensors")
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, path)
        self.files[key] = (path, str(next(iter(tensors.values())).device))

    def take(self, key) -> dict[str, torch.Tensor]:
        if key in self.memory:
            tensors, size = self.memory.pop(key)
            self.left += size
            return tensors
        path, device = self.files.pop(key)
        tensors = load_file(path, device=device)
        os.unlink(path)
        return tensors

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()


class Kept:
    """Per batch, outputs of the fused model's modules inside the block it runs, kept (within the
    budget of ``held``) for its later runs of the block to take instead of computing them. A
    module whose call ends before a stage's first layer is called is final for the rest of the
    block (what it computed from depends only on the block's input and on layers already refit);
    the outermost such modules are kept. Never kept: modules called more than once per forward
    pass, outputs other than a tensor or a tuple of tensors; an output modified in place after it
    was kept (its version moved) is dropped, and that module always computed."""

    def __init__(self, held: Held, model: nn.Module, blocks: Sequence[str], repeated: set[str]):
        self.held = held
        self.modules = dict(model.named_modules())
        self.inside = [[n for n in self.modules if n.startswith(f"{b}.") and n not in repeated] for b in blocks]
        self.outputs: dict[int, dict[str, tuple[object, list[int], int]]] = {}
        self.unsafe: set[str] = set()

    def reuse(self, b: int) -> dict[str, object]:
        mine = self.outputs.get(b, {})
        for name in [n for n, (out, versions, _) in mine.items() if [t._version for t in _tensors(out)] != versions]:
            self.unsafe.add(name)
            self._drop(b, name)
        return {n: out for n, (out, _, _) in mine.items()}

    @contextmanager
    def watch(self, b: int, block: int, first: str) -> Iterator[None]:
        """Keep, from the run inside, the outermost modules of ``block`` whose call ended before
        ``first`` was called."""
        ended: dict[str, tuple[object, list[int]]] = {}
        started = [False]

        def end(name: str, out) -> None:
            tensors = None if started[0] else _tensors(out)
            if tensors is not None:
                ended[name] = (out, [t._version for t in tensors])

        handles = [self.modules[first].register_forward_pre_hook(lambda m, a: started.__setitem__(0, True))]
        handles += [self.modules[n].register_forward_hook(lambda m, i, o, n=n: end(n, o))
                    for n in self.inside[block] if n not in self.unsafe]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        outer = {n: seen for n, seen in ended.items() if not any(a in ended for a in _ancestors(n))}
        mine = self.outputs.setdefault(b, {})
        for name in [n for n in mine if n not in outer]:  # now inside a kept module
            self._drop(b, name)
        for name, (out, versions) in outer.items():
            size = nbytes(_tensors(out))
            if name not in mine and self.held.reserve(size):
                mine[name] = (out, versions, size)

    def _drop(self, b: int, name: str) -> None:
        self.held.left += self.outputs[b].pop(name)[2]

    def clear(self) -> None:
        self.held.left += sum(size for mine in self.outputs.values() for _, _, size in mine.values())
        self.outputs = {}


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    return (".".join(parts[:k]) for k in range(1, len(parts)))


def _tensors(out) -> list[torch.Tensor] | None:
    """The tensors of a module's output: a tensor, or a tuple of tensors and Nones; else None."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple) and all(t is None or isinstance(t, torch.Tensor) for t in out):
        return [t for t in out if t is not None]
    return None
