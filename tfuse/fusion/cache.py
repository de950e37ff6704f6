"""A cache of streamed activation statistics, so that a sweep over the knobs that act only after
them (solver, reg, normalisation, metric, a residual policy needing the same probes) streams the
calibration data once.

An entry is keyed by everything the statistics depend on: the weights of every model and of the
reference, the data and which calibration samples (count, batch size, seed), the token filter,
whether plain sums are kept, and the probes the plan reads. The key is stored inside the entry
and compared on load: an entry that is corrupt or was written for another key is recomputed,
never trusted.

The repair's targets (``fusion.cache_targets``) are kept the same way, keyed by the aligned
parents' weights and the repair's data: a folder per entry, one file per stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.rules import Plan
from tfuse.fusion.statistics import Moments, PairStats, Statistics
from tfuse.io import locked

FORMAT = 1


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StatisticsCache:
    """Where entries live, and what identifies the calibration data (the ``data`` config)."""

    folder: Path
    data: dict[str, Any]

    def key(self, models: Sequence[nn.Module], reference: nn.Module, graph: FlowGraph, plan: Plan, settings) -> dict:
        return {
            "format": FORMAT,
            "models": [tensors_sha256(m.state_dict()) for m in models],
            "reference": tensors_sha256(reference.state_dict()),
            "data": self.data,
            "samples": settings.samples, "batch_size": settings.batch_size, "seed": settings.seed,
            "tokens": settings.tokens, "window": settings.window, "token_count": settings.token_count,
            "sums": bool(settings.center or settings.standardize),
            "spaces": {name: [list(s) for s in segments] for name, segments in plan.segments.items()},
            "magnitude": plan.magnitude_probes(),
            "probes": {name: repr(probe) for name, probe in sorted(graph.probes.items())},
        }

    def get(self, key: dict, reference: nn.Module, compute: Callable[[], Statistics]) -> tuple[Statistics, bool]:
        """The cached statistics of ``key`` (and True), or freshly computed and stored (False)."""
        text = json.dumps(key, sort_keys=True)
        path = self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.safetensors"
        device = next(reference.parameters()).device
        with locked(path):  # parallel jobs of a sweep compute an entry once
            stats = _load(path, text, device)
            if stats is not None:
                return stats, True
            stats = compute()
            _save(path, text, stats)
            return stats, False

    def targets_key(self, targets: Sequence[nn.Module], weights: Sequence[float], settings) -> dict:
        """What the repair's targets depend on: the aligned parents, their weights, the repair's
        samples and how they are drawn."""
        return {
            "format": FORMAT, "targets": [tensors_sha256(m.state_dict()) for m in targets],
            "weights": [float(w) for w in weights], "data": self.data, "repair": settings.repair,
            "samples": settings.repair_samples, "batch_size": settings.batch_size, "seed": settings.seed,
            "tokens": settings.repair_tokens, **({"per_sample": settings.repair_targets}
                                                 if settings.repair_targets != "mean" else {}),
        }

    @contextmanager
    def repair_targets(self, key: dict) -> Iterator["TargetStore"]:
        """The entry of ``key``, locked for the block: read when it holds the targets, else written
        (in a temporary folder, moved into place when the block ends without error)."""
        text = json.dumps(key, sort_keys=True)
        path = self.folder / "targets" / hashlib.sha256(text.encode()).hexdigest()[:24]
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path):
            store = TargetStore(path, text)
            try:
                yield store
                store.commit()
            finally:
                store.discard()


class TargetStore:
    """The repair's targets of one entry: ``layout.json`` (the key, each stage's layers and target
    names, the batch count) and ``stage-K.safetensors`` holding ``"batch|name"`` tensors. Written
    stage by stage, so memory holds one stage's targets at most."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.source = "computed"  # or "cached" once ``begin`` found the entry whole
        self.layout: dict = {}
        self.tmp: Path | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.open_stage: tuple[int, Any] | None = None
        self.device = "cpu"

    def begin(self, stages: Sequence[Sequence[str]], batches: int, model: nn.Module) -> bool:
        """True when the entry holds the targets of these stages and batches (then read onto the
        model's device); else it is written as the repair computes them."""
        self.device = str(next(model.parameters()).device)
        self.layout = {"key": self.key, "stages": [list(s) for s in stages], "batches": batches, "names": []}
        stored = self._stored_layout()
        if stored is not None:
            self.layout, self.source = stored, "cached"
            return True
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        return False

    def _stored_layout(self) -> dict | None:
        """The entry's layout if it matches and every stage file is whole and complete."""
        try:
            stored = json.loads((self.path / "layout.json").read_text())
            same = all(stored.get(k) == v for k, v in self.layout.items() if k != "names")
            if not same or len(stored["names"]) != len(stored["stages"]):
                return None
            for k, names in enumerate(stored["names"]):
                with safe_open(str(self._file(self.path, k)), framework="pt") as handle:
                    expected = {f"{b}|{n}" for b in range(stored["batches"]) for n in names}
                    if (handle.metadata() or {}).get("key") != self.path.name or set(handle.keys()) != expected:
                        return None
            return stored
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None  # missing, corrupt or foreign: recomputed

    @staticmethod
    def _file(folder: Path, stage: int) -> Path:
        return folder / f"stage-{stage}.safetensors"

    def read(self, stage: int, batch: int) -> dict[str, torch.Tensor]:
        if self.open_stage is None or self.open_stage[0] != stage:
            self.open_stage = (stage, safe_open(str(self._file(self.path, stage)), framework="pt", device=self.device))
        handle = self.open_stage[1]
        return {n: handle.get_tensor(f"{batch}|{n}") for n in self.layout["names"][stage]}

    def write(self, stage: int, batch: int, targets: dict[str, torch.Tensor]) -> None:
        if batch == 0:
            self.layout["names"].append(sorted(targets))
        self.pending.update({f"{batch}|{n}": t.detach().cpu().contiguous() for n, t in targets.items()})

    def end_stage(self, stage: int) -> None:
        save_file(self.pending, str(self._file(self.tmp, stage)), metadata={"key": self.path.name})
        self.pending = {}

    def commit(self) -> None:
        """Move a written entry into place (replacing a corrupt or foreign one)."""
        if self.tmp is None:
            return
        (self.tmp / "layout.json").write_text(json.dumps(self.layout))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        self.open_stage = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _load(path: Path, key: str, device: torch.device) -> Statistics | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
        return _unpack(load_file(str(path), device=str(device)))
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # corrupt or foreign: recomputed


def _save(path: Path, key: str, stats: Statistics) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(_pack(stats), tmp, metadata={"key": key})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _pack(stats: Statistics) -> dict[str, torch.Tensor]:
    """Flat tensors: each model's moments and cross-products per space, the reference's moments
    once per space (every model's entry shares them)."""
    out: dict[str, torch.Tensor] = {}

    def moments(prefix: str, m: Moments) -> None:
        out[f"{prefix}|count"] = torch.tensor(m.count)
        out[f"{prefix}|sumsq"] = m.sumsq
        if m.sum is not None:
            out[f"{prefix}|sum"] = m.sum

    for k, pairs in enumerate(stats.pairs):
        for space, pair in pairs.items():
            moments(f"pairs|{k}|{space}|a", pair.a)
            out[f"pairs|{k}|{space}|cross"] = pair.cross
            if f"ref|{space}|sumsq" not in out:
                moments(f"ref|{space}", pair.b)
    for k, magnitude in enumerate(stats.magnitude):
        out[f"magnitude|{k}|-"] = torch.zeros(0)  # models without magnitude probes still count
        for probe, value in magnitude.items():
            out[f"magnitude|{k}|{probe}"] = value
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}


def _unpack(flat: dict[str, torch.Tensor]) -> Statistics:
    models = 1 + max(int(name.split("|")[1]) for name in flat if name.startswith("magnitude|"))
    pairs: list[dict[str, PairStats]] = [{} for _ in range(models)]
    magnitude: list[dict[str, torch.Tensor]] = [{} for _ in range(models)]

    def moments(prefix: str) -> Moments:
        return Moments(int(flat[f"{prefix}|count"]), flat.get(f"{prefix}|sum"), flat[f"{prefix}|sumsq"])

    reference: dict[str, Moments] = {}
    for name, value in flat.items():
        kind, rest = name.split("|", 1)
        if kind == "pairs" and name.endswith("|cross"):
            k, space = rest.removesuffix("|cross").split("|", 1)
            if space not in reference:
                reference[space] = moments(f"ref|{space}")
            pairs[int(k)][space] = PairStats(moments(f"pairs|{k}|{space}|a"), reference[space], value)
        elif kind == "magnitude":
            k, probe = rest.split("|", 1)
            if probe != "-":
                magnitude[int(k)][probe] = value
    return Statistics(pairs, magnitude)
