"""How the training split is dealt among recipe parents (config group ``partition``): parent i
trains on shard i; validation and test stay shared and IID.

Kinds: ``iid`` (every parent sees the whole split), ``skew`` (classes dealt to the parents in
contiguous groups; a parent holds ``fraction`` of its own classes' images and an equal share of
the rest: OTFusion's personalised split for N parents), ``dirichlet`` (per class, the parents'
shares drawn from Dirichlet(``alpha``)), ``classes`` (disjoint class groups) and ``sizes`` (random
shards of the given ``fractions``). Shards are drawn from ``partition.seed`` alone, never from the
parents' training seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from tfuse.errors import TfuseError

KINDS = ("iid", "skew", "dirichlet", "classes", "sizes")
CLASS_KINDS = ("skew", "dirichlet", "classes")  # those that need class labels


@dataclass(frozen=True)
class Partition:
    """A partition's settings (``configs/partition/*.yaml``), checked on construction."""

    kind: str = "iid"
    seed: int = 0
    fraction: float = 0.9  # skew: the share of its own classes a parent holds
    alpha: float = 0.5  # dirichlet: concentration (0.5 moderate, 0.1 severe)
    fractions: tuple[float, ...] | None = None  # sizes: one per parent (null: equal)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TfuseError(f"partition.kind={self.kind!r} is not known; allowed: {', '.join(KINDS)} (partition=NAME)")
        if not 0 < self.fraction <= 1:
            raise TfuseError(f"partition.fraction={self.fraction} must lie in (0, 1]")
        if not self.alpha > 0:
            raise TfuseError(f"partition.alpha={self.alpha} must be positive (0.5 moderate, 0.1 severe)")
        if self.fractions is not None:
            if any(not 0 < f <= 1 for f in self.fractions):
                raise TfuseError(f"partition.fractions={list(self.fractions)}: each must lie in (0, 1]")
            if abs(sum(self.fractions) - 1) > 1e-6:
                raise TfuseError(f"partition.fractions={list(self.fractions)} must sum to 1 (they cover the training split)")

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> "Partition":
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise TfuseError(f"unknown partition setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if data.get("fractions") is not None:
            data["fractions"] = tuple(float(f) for f in data["fractions"])
        return cls(**data)

    @property
    def iid(self) -> bool:
        return self.kind == "iid"

    def as_dict(self) -> dict[str, Any]:
        """What the shards depend on (the parents' cache key), only the kind's own knobs."""
        own = {"skew": ("fraction",), "dirichlet": ("alpha",), "sizes": ("fractions",)}.get(self.kind, ())
        out = {"kind": self.kind, "seed": self.seed}
        out.update({k: list(v) if isinstance(v, tuple) else v for k in own if (v := getattr(self, k)) is not None})
        return out


def shards(partition: Partition, labels: torch.Tensor | None, n_train: int, n_parents: int) -> list[torch.Tensor]:
    """Each parent's training indices (sorted), by the partition's rule. ``labels`` are the
    training split's classes (None for a task without classes: only ``iid`` and ``sizes``)."""
    if partition.iid:
        return [torch.arange(n_train) for _ in range(n_parents)]
    if partition.kind in CLASS_KINDS and labels is None:
        raise TfuseError(f"partition={partition.kind} deals classes, but this task's training data has no class labels; "
                         "use partition=sizes or iid")
    rng = np.random.default_rng(partition.seed)
    if partition.kind == "sizes":
        fractions = partition.fractions or tuple([1 / n_parents] * n_parents)
        if len(fractions) != n_parents:
            raise TfuseError(f"partition.fractions has {len(fractions)} entries but there are {n_parents} parents")
        order = rng.permutation(n_train)
        cuts = _counts(np.asarray(fractions), n_train)
        parts = np.split(order, np.cumsum(cuts)[:-1])
    else:
        y = labels.cpu().numpy()
        classes = np.unique(y)
        if partition.kind == "classes" and n_parents > len(classes):
            raise TfuseError(f"partition=classes deals {len(classes)} classes to {n_parents} parents; "
                             "use at most as many parents as classes")
        groups = owners(len(classes), n_parents)
        parts = [[] for _ in range(n_parents)]
        for c, owner in zip(classes, groups):
            members = rng.permutation(np.flatnonzero(y == c))
            cuts = _counts(_shares(partition, owner, n_parents, rng), len(members))
            for i, piece in enumerate(np.split(members, np.cumsum(cuts)[:-1])):
                parts[i].append(piece)
        parts = [np.concatenate(p) for p in parts]
    return [torch.from_numpy(np.sort(p)).long() for p in parts]


def owners(n_classes: int, n_parents: int) -> list[int]:
    """The parent that owns each class under ``skew`` and ``classes``: contiguous groups, as
    equal as possible (classes 0-4 and 5-9 for two parents)."""
    return [i for i, group in enumerate(np.array_split(np.arange(n_classes), n_parents)) for _ in group]


def _shares(partition: Partition, owner: int, n_parents: int, rng: np.random.Generator) -> np.ndarray:
    """One class's shares among the parents."""
    if partition.kind == "dirichlet":
        return rng.dirichlet(np.full(n_parents, partition.alpha))
    own = 1.0 if partition.kind == "classes" or n_parents == 1 else partition.fraction
    shares = np.full(n_parents, (1 - own) / max(n_parents - 1, 1))
    shares[owner] = own
    return shares


def _counts(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``shares`` (largest remainders; ties to
    the lower index, so that the rule is exact and reproducible)."""
    raw = shares / shares.sum() * total
    counts = np.floor(raw + 1e-9).astype(int)
    rest = total - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def describe(partition: Partition, parts: Sequence[torch.Tensor], labels: torch.Tensor | None,
             n_classes: int | None, batch_size: int) -> dict:
    """results.json's ``partition``: the kind, its seed and knobs, and each shard's size and class
    counts; a non-IID shard smaller than one training batch (an empty one included) is refused."""
    out = {**partition.as_dict(), "shards": []}
    for i, index in enumerate(parts):
        shard = {"size": len(index)}
        if labels is not None and n_classes:
            shard["classes"] = torch.bincount(labels[index], minlength=n_classes).tolist()
        if not partition.iid and len(index) < batch_size:
            raise TfuseError(f"partition={partition.kind}: parent {i}'s shard holds {len(index)} training examples, "
                             f"fewer than one batch (train.batch_size={batch_size}); change partition.seed, use fewer "
                             "parents or a milder partition")
        out["shards"].append(shard)
    return out


def own_classes(description: dict, n_parents: int) -> list[list[int]] | None:
    """Each parent's own classes: those it holds more than an equal share of (None for a kind
    that does not deal classes, or data without classes)."""
    if description.get("kind", "iid") not in CLASS_KINDS or "classes" not in description["shards"][0]:
        return None
    counts = np.array([s["classes"] for s in description["shards"]], dtype=float)
    totals = counts.sum(0)
    return [[c for c in range(counts.shape[1]) if totals[c] and counts[i, c] / totals[c] > 1 / n_parents + 1e-9]
            for i in range(n_parents)]
