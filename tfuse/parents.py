"""Parents: loaded from checkpoints, or trained from an experiment's recipe and cached."""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from tfuse.arch import family, family_for, load_parent, model_dtype
from tfuse.errors import TfuseError
from tfuse.io import locked, new_directory, write_json
from tfuse.partition import Partition, describe, shards
from tfuse.tasks.base import Task
from tfuse.training import epochs_to_steps, train


@dataclass
class Parent:
    model: nn.Module
    source: str
    trained_seconds: float = 0.0  # 0 when loaded or taken from the cache
    seed: int | None = None  # a recipe parent's training seed
    head: str | None = None  # how a headless checkpoint's head was fitted (``fit_head``)


def recipe(cfg: DictConfig, seed: int, shard: tuple[int, int] | None = None) -> dict:
    """What determines a recipe parent: architecture, data, schedule and seed, and under a non-IID
    partition its settings and the parent's ``shard`` (index, count). Not ``model.dtype``: parents
    train in float32 and are cast when used, so one cached parent serves every dtype."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("dtype", None)
    out = {
        "model": model,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "seed": seed,
    }
    part = partition_of(cfg)
    if not part.iid and shard is not None:  # IID parents keep the keys they always had
        out["partition"] = {**part.as_dict(), "shard": list(shard)}
    return out


def recipe_dir(cfg: DictConfig, seed: int, shard: tuple[int, int] | None = None) -> Path:
    key = hashlib.sha1(json.dumps(recipe(cfg, seed, shard), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"{cfg.model.family}-{cfg.data.name}-{key}-seed{seed}"


def partition_of(cfg: DictConfig) -> Partition:
    """The ``partition`` group's settings (``iid`` when the config has none)."""
    data = cfg.get("partition")
    return Partition.from_config(OmegaConf.to_container(data, resolve=True) if data is not None else None)


def parent_shards(cfg: DictConfig, task: Task) -> tuple[list[torch.Tensor], dict]:
    """Each recipe parent's training indices under ``partition``, and their description
    (results.json ``partition``)."""
    part = partition_of(cfg)
    labels = getattr(task, "train_labels", None)
    parts = shards(part, labels, task.train_size, len(parent_seeds(cfg)))
    return parts, describe(part, parts, labels, getattr(task, "num_classes", None), cfg.train.batch_size)


def train_parent(cfg: DictConfig, task: Task, seed: int, device: str) -> tuple[nn.Module, dict]:
    """A parent trained from scratch with ``seed``, and its metrics."""
    torch.manual_seed(seed)
    model = family(cfg.model.family).build(cfg.model, task).to(device)
    t = cfg.train
    steps = epochs_to_steps(t.epochs, task.train_size, t.batch_size)
    stats = train(
        model, task, steps=steps, lr=t.lr, batch_size=t.batch_size, seed=seed, warmup=t.warmup,
        schedule="cosine" if t.cosine else "constant", weight_decay=t.weight_decay, device=device,
        description=f"training parent (seed {seed})",
    )
    metrics = {"seed": seed, "train": stats, "val": task.evaluate(model, "val"), "test": task.evaluate(model, "test")}
    return model, metrics


def as_dtype(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """A recipe model (trained in float32) cast to ``model.dtype``; as it is under auto."""
    dtype = model_dtype(cfg.model)
    return model if dtype == "auto" else model.to(dtype)


def save_parent(model: nn.Module, cfg: DictConfig, metrics: dict, seed: int, path: Path,
                shard: tuple[int, int] | None = None) -> None:
    """Write a parent with ``save_pretrained``-style files beside its metrics and recipe."""
    with new_directory(path) as tmp:
        family(cfg.model.family).save(model, str(tmp))
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "recipe.json", recipe(cfg, seed, shard))


def parent_seeds(cfg: DictConfig) -> list[int]:
    """The recipe parents' training seeds: ``parent_seeds``, else 0 .. n_parents-1."""
    seeds = cfg.get("parent_seeds")
    if seeds is None:
        if cfg.n_parents < 1:
            raise TfuseError(f"n_parents={cfg.n_parents}: give at least one parent")
        return list(range(cfg.n_parents))
    if not OmegaConf.is_list(seeds) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise TfuseError(f"parent_seeds={seeds}: give a list of integer seeds, one per parent (e.g. parent_seeds=[2,3])")
    return list(seeds)


def parent_configs(cfg: DictConfig) -> list[DictConfig]:
    """One config per recipe parent: ``cfg`` itself, or with ``parent_models[i]`` merged into its
    ``model`` group (heterogeneous parents: e.g. a wide and a narrow ViT)."""
    count = len(parent_seeds(cfg))
    overrides = cfg.get("parent_models")
    if not overrides:
        return [cfg] * count
    if len(overrides) != count:
        given = f"n_parents={count}" if cfg.get("parent_seeds") is None else f"parent_seeds has {count}"
        raise TfuseError(f"parent_models has {len(overrides)} entries but {given}; give one model override per parent")
    out = []
    for i, extra in enumerate(overrides):
        one = copy.deepcopy(cfg)
        with open_dict(one):
            one.model = OmegaConf.merge(cfg.model, extra or {})
            one.parent_models = None
        out.append(one)
    return out


def obtain_parents(cfg: DictConfig, task: Task, device: str, parts: list[torch.Tensor] | None = None) -> list[Parent]:
    """``parents=[...]`` when given, else the experiment's recipe (trained once, then cached): one
    parent per seed of ``parent_seeds`` (default 0 .. n_parents-1), each with its ``parent_models``
    override, parent i on the training examples ``parts[i]`` under a non-IID partition."""
    fam, dtype = cfg.model.family, model_dtype(cfg.model)
    if cfg.parents:
        if not partition_of(cfg).iid:
            raise TfuseError(f"partition={partition_of(cfg).kind} deals the data to recipe parents, but parents=[...] "
                             "are checkpoints already trained; drop the partition override")
        loaded = [Parent(load_parent(str(s), fam, f"parents[{i}]", dtype).to(device), str(s)) for i, s in enumerate(cfg.parents)]
        for i, parent in enumerate(loaded):
            fit_missing_head(parent, task, f"parents[{i}]")
        return loaded
    iid = partition_of(cfg).iid
    seeds = parent_seeds(cfg)
    out = []
    for i, (seed, one) in enumerate(zip(seeds, parent_configs(cfg))):
        shard = (i, len(seeds))
        path = recipe_dir(one, seed, shard)
        with locked(path):  # parallel jobs of a sweep train a shared parent once
            if path.is_dir():
                cached = load_parent(str(path), fam, f"cached parent {path}", model_dtype(one.model))
                out.append(Parent(cached.to(device), str(path), seed=seed))
                continue
            own = task if iid or parts is None else task.restricted(parts[i])
            model, metrics = train_parent(one, own, seed, device)
            save_parent(model, one, metrics, seed, path, shard)  # the cache keeps float32
            out.append(Parent(as_dtype(model, one), str(path), metrics["train"]["seconds"], seed))
    return out


def fit_missing_head(parent: Parent, task: Task, label: str) -> None:
    """A parent its family loaded from a headless encoder checkpoint (marked ``tfuse_headless``:
    the class held) gets the head its family's ``fit_head`` fits on ``task``, alike for every parent."""
    held = getattr(parent.model, "tfuse_headless", None)
    if held:
        parent.head = f"headless {held}: {family_for(parent.model).fit_head(parent.model, task)}"
        print(f"{label}: {parent.head}", file=sys.stderr)
