"""Token filters (``fusion.tokens``, ``fusion.repair_tokens``): which tokens of each example
count as samples of the activation statistics and of the repair. A filter marks the tokens it
keeps in ``keep`` (examples x tokens); padding is dropped afterwards, whatever the filter."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.graph import TokenLayout
from tfuse.fusion.registry import Registry


class TokenSettings(Protocol):
    """The knobs the token filters read; ``FusionSettings`` satisfies it."""

    tokens: str
    window: int
    token_count: int


Batch = dict[str, torch.Tensor]
TokenFilter = Callable[[torch.Tensor, torch.Tensor, TokenLayout, TokenSettings, torch.Generator], None]
TOKEN_FILTERS: Registry[TokenFilter] = Registry("tokens")


@TOKEN_FILTERS.register("all")
def _all(keep, valid, layout, settings, generator) -> None:
    keep[:] = True


@TOKEN_FILTERS.register("cls")
def _cls(keep, valid, layout, settings, generator) -> None:
    if layout.cls is None:
        raise _token_error("cls", "it has no class token; use tokens=all or random")
    keep[:, layout.cls] = True


@TOKEN_FILTERS.register("window")
def _window(keep, valid, layout, settings, generator) -> None:
    """The central ``window`` x ``window`` patches, and the class token when the model has one."""
    if layout.cls is not None:
        keep[:, layout.cls] = True
    if layout.grid is None:
        raise _token_error("window", "it has no patch grid; use tokens=all, cls or random")
    rows, cols = layout.grid
    k = min(settings.window, rows, cols)
    r0, c0 = (rows - k) // 2, (cols - k) // 2
    keep[:, [layout.prefix + (r0 + r) * cols + c0 + c for r in range(k) for c in range(k)]] = True


@TOKEN_FILTERS.register("random")
def _random(keep, valid, layout, settings, generator) -> None:
    """``token_count`` real tokens per example, drawn with the seeded generator."""
    scores = torch.rand(keep.shape, generator=generator).masked_fill(~valid, -1.0)
    keep.scatter_(1, scores.topk(min(settings.token_count, keep.shape[1]), dim=1).indices, True)


def token_mask(
    batch: Batch, tokens: int, layout: TokenLayout, settings: TokenSettings, generator: torch.Generator
) -> torch.Tensor:
    """Which tokens of each example count as samples (real tokens only; padding never counts)."""
    size = next(iter(batch.values())).shape[0]
    valid = batch.get("attention_mask")
    valid = torch.ones(size, tokens, dtype=torch.bool) if valid is None else valid.bool().cpu()
    keep = torch.zeros_like(valid)
    TOKEN_FILTERS[settings.tokens](keep, valid, layout, settings, generator)
    return keep & valid


def _token_error(mode: str, why: str) -> Exception:
    return TfuseError(f"fusion.tokens={mode} does not apply to this model: {why}")
