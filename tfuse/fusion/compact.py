"""Maps kept small: a hard map (a signed permutation, entries +-1/n) as the index and sign of each
reference neuron's source, applied by gathering; a soft map dense in float32.

``CompactMaps`` stores maps compactly and hands out the dense float64 matrix the costs and the
residual policies read, so code written for dense maps runs unchanged on it.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Collection, Iterator

import torch


@dataclass(frozen=True)
class HardMap:
    """Reference neuron ``j`` takes parent neuron ``source[j]`` times ``sign[j]`` (None: all +1)."""

    source: torch.Tensor
    sign: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.source.numel(), self.source.numel())

    def dense(self) -> torch.Tensor:
        n, device = self.source.numel(), self.source.device
        t = torch.zeros(n, n, dtype=torch.float64, device=device)
        values = (torch.full((n,), 1.0 / n, dtype=torch.float64, device=device) if self.sign is None
                  else self.sign.to(device).double() / n)
        t[self.source, torch.arange(n, device=device)] = values
        return t

    def gather(self, w: torch.Tensor, axis: int, magnitude: bool = False) -> torch.Tensor:
        """``w`` with its ``axis`` in the reference's order: the output side (``n T^T w``) and the
        input side (``w n T``) of a signed permutation are the same gather."""
        out = w.index_select(axis, self.source.to(w.device))
        if self.sign is None or magnitude:
            return out
        shape = [1] * w.dim()
        shape[axis] = -1
        return out * self.sign.to(w.device, w.dtype).view(shape)


def compact(t: torch.Tensor) -> HardMap | torch.Tensor:
    """A hard map when ``t`` is a square signed permutation scaled by 1/n, else ``t`` in float32."""
    n = t.shape[0]
    if t.shape[0] == t.shape[1]:
        nonzero = t != 0
        if bool((nonzero.sum(0) == 1).all()) and bool((nonzero.sum(1) == 1).all()):
            source = nonzero.to(torch.int8).argmax(0)
            values = t[source, torch.arange(n)]
            if bool(torch.allclose(values.abs(), torch.full_like(values, 1.0 / n), rtol=1e-6, atol=0)):
                negative = values < 0
                return HardMap(source, torch.where(negative, -1, 1).to(torch.int8) if bool(negative.any()) else None)
    return t.float()


def dense(m: HardMap | torch.Tensor) -> torch.Tensor:
    return m.dense() if isinstance(m, HardMap) else m.double()


class CompactMaps(MutableMapping):
    """Maps by space, stored compactly (``raw``), read back dense in float64."""

    def __init__(self) -> None:
        self.raw: dict[str, HardMap | torch.Tensor] = {}

    def __getitem__(self, space: str) -> torch.Tensor:
        return dense(self.raw[space])

    def __setitem__(self, space: str, t: torch.Tensor) -> None:
        self.raw[space] = compact(t)

    def __delitem__(self, space: str) -> None:
        del self.raw[space]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def nbytes(self) -> int:
        """Memory the maps hold."""
        total = 0
        for m in self.raw.values():
            parts = [m.source, m.sign] if isinstance(m, HardMap) else [m]
            total += sum(p.numel() * p.element_size() for p in parts if p is not None)
        return total


def sign_flips(maps: CompactMaps, signed: Collection[str]) -> dict[str, list[int]]:
    """Per signed space: how many of the reference's neurons receive a negated parent neuron (a
    hard map's negative signs; a soft map's columns whose mass sums negative), of how many."""
    out = {}
    for space in sorted(signed):
        m = maps.raw.get(space)
        if m is not None:
            flips = (0 if m.sign is None else int((m.sign < 0).sum())) if isinstance(m, HardMap) else int((m.sum(0) < 0).sum())
            out[space] = [flips, m.shape[1]]
    return out
