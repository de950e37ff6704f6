"""Parents: loaded from checkpoints, or trained from an experiment's recipe and cached."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from tfuse.arch import family, load_parent
from tfuse.errors import TfuseError
from tfuse.io import locked, new_directory, write_json
from tfuse.tasks.base import Task
from tfuse.training import epochs_to_steps, train


@dataclass
class Parent:
    model: nn.Module
    source: str
    trained_seconds: float = 0.0  # 0 when loaded or taken from the cache
    seed: int | None = None  # a recipe parent's training seed


def recipe(cfg: DictConfig, seed: int) -> dict:
    """What determines a recipe parent: architecture, data, schedule and seed."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "seed": seed,
    }


def recipe_dir(cfg: DictConfig, seed: int) -> Path:
    key = hashlib.sha1(json.dumps(recipe(cfg, seed), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"{cfg.model.family}-{cfg.data.name}-{key}-seed{seed}"


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


def save_parent(model: nn.Module, cfg: DictConfig, metrics: dict, seed: int, path: Path) -> None:
    """Write a parent with ``save_pretrained``-style files beside its metrics and recipe."""
    with new_directory(path) as tmp:
        family(cfg.model.family).save(model, str(tmp))
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "recipe.json", recipe(cfg, seed))


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


def obtain_parents(cfg: DictConfig, task: Task, device: str) -> list[Parent]:
    """``parents=[...]`` when given, else the experiment's recipe (trained once, then cached): one
    parent per seed of ``parent_seeds`` (default 0 .. n_parents-1), each with its ``parent_models``
    override."""
    fam = cfg.model.family
    if cfg.parents:
        return [Parent(load_parent(str(s), fam, f"parents[{i}]").to(device), str(s)) for i, s in enumerate(cfg.parents)]
    out = []
    for seed, one in zip(parent_seeds(cfg), parent_configs(cfg)):
        path = recipe_dir(one, seed)
        with locked(path):  # parallel jobs of a sweep train a shared parent once
            if path.is_dir():
                out.append(Parent(load_parent(str(path), fam, f"cached parent {path}").to(device), str(path), seed=seed))
                continue
            model, metrics = train_parent(one, task, seed, device)
            save_parent(model, one, metrics, seed, path)
            out.append(Parent(model, str(path), metrics["train"]["seconds"], seed))
    return out
