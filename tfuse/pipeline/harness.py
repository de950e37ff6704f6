"""``eval.lm_eval``: causal LMs scored by lm-evaluation-harness (the optional ``lmeval`` extra) on
the tasks papers report, beside tfuse's own scores. Every parent, their ensemble, each fused model
and each finetuned fused model is handed to lm-eval's ``HFLM`` as it is in memory, with the
tokenizer it carries; the tasks are looked up in ``include_path`` (local task YAMLs, such as
configs/lm_eval/plays_cloze.yaml, which reads nothing from the network) and then among lm-eval's
own. results.json ``lm_eval``: ``{"one_shot"|"finetuned": {model: {task: {metric: value}}}}``."""
from __future__ import annotations

import copy
import importlib.util
import logging
import random
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tfuse.arch import is_causal
from tfuse.arch.tokenized import tokenizer_of
from tfuse.errors import TfuseError
from tfuse.pipeline.state import Fused, Setup, Tuned
from tfuse.tasks.base import evaluating, mixed_log_probs

INSTALL = "pip install -e '.[lmeval]'"


@dataclass(frozen=True)
class Harness:
    """The ``eval.lm_eval`` block, checked, with lm-eval's index of the tasks it names."""

    tasks: tuple[str, ...]
    limit: int | float | None
    include_path: str | None
    batch_size: int
    manager: Any = field(compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Harness | None":
        """None when ``eval.lm_eval.tasks`` is empty; otherwise every value checked, and every task
        found, before anything is fused."""
        block = (cfg.get("eval") or {}).get("lm_eval")
        given = OmegaConf.to_container(block, resolve=True) if block else {}
        tasks = given.get("tasks") or []
        tasks = [tasks] if isinstance(tasks, str) else tasks
        if not tasks:
            return None
        if not all(isinstance(t, str) and t for t in tasks):
            raise TfuseError(f"eval.lm_eval.tasks={tasks!r}: give task names, e.g. eval.lm_eval.tasks=[plays_cloze]")
        if not is_causal(cfg.model.family):
            raise TfuseError(f"eval.lm_eval scores causal LMs; model.family={cfg.model.family} is not one "
                             "(drop eval.lm_eval.tasks)")
        limit, batch, include = given.get("limit"), given.get("batch_size", 16), given.get("include_path")
        if limit is not None and not (_count(limit) or isinstance(limit, float) and 0 < limit < 1):
            raise TfuseError(f"eval.lm_eval.limit={limit!r}: give a number of items per task, a fraction "
                             "between 0 and 1, or null (all)")
        if not _count(batch):
            raise TfuseError(f"eval.lm_eval.batch_size={batch!r} must be a positive number of requests")
        if include is not None and not Path(include).exists():
            raise TfuseError(f"eval.lm_eval.include_path={include}: no such folder; give the folder of your task "
                             "YAMLs (e.g. configs/lm_eval)")
        if importlib.util.find_spec("lm_eval") is None:
            raise TfuseError(f"eval.lm_eval needs lm-evaluation-harness, which is not installed: {INSTALL}")
        return cls(tuple(tasks), limit, include, batch, task_manager(tasks, include))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm-eval's task index: of ``include_path`` alone when it holds every task (indexing
    lm-eval's own thousands of YAMLs takes seconds), else of both."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"in {include_path} or " if include_path else ""
        raise TfuseError(f"eval.lm_eval.tasks: {', '.join(unknown)} not found {where}among lm-eval's tasks; "
                         "give eval.lm_eval.include_path=FOLDER of your task YAMLs")
    return manager


class NotScored(Exception):
    """A model that cannot answer a task's requests (the ensemble asked to generate)."""


def language_model(models: Sequence[nn.Module], batch_size: int):
    """lm-eval's ``HFLM`` over one in-memory model, or over several whose probabilities it
    averages (the ensemble: loglikelihood tasks only)."""
    from lm_eval.models.huggingface import HFLM

    tokenizer = tokenizer_of(models[0])
    if tokenizer is None:
        raise TfuseError("eval.lm_eval needs the parents' tokenizer (saved beside their weights)")

    class Ensemble(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():  # log-probabilities are logits whose log-softmax is themselves
                return mixed_log_probs(F.log_softmax(m(inps).logits.float(), dim=-1) for m in models)

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotScored("the ensemble has no generate(); it is scored on loglikelihood tasks only")

    kind = Ensemble if len(models) > 1 else HFLM  # lm-eval may set a pad token: on a copy, not the model's
    return kind(pretrained=models[0], tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def evaluate(lm, harness: Harness) -> dict[str, dict[str, float]]:
    """Each task's numeric metrics (``acc``, ``acc_stderr``, ...; a filter other than lm-eval's
    ``none`` kept in the name)."""
    import lm_eval

    found = lm_eval.simple_evaluate(model=lm, tasks=list(harness.tasks), task_manager=harness.manager,
                                    limit=harness.limit, log_samples=False)
    return {task: {key.removesuffix(",none"): float(value) for key, value in metrics.items()
                   if "," in key and isinstance(value, (int, float))}
            for task, metrics in found["results"].items()}


def harness_scores(harness: Harness, setup: Setup, fused: Fused, tuned: Tuned) -> dict:
    """results.json ``lm_eval``: every parent, the ensemble and each fused model (``one_shot``),
    each finetuned fused model (``finetuned``); ``not_applicable`` says which was not scored, and why."""
    from lm_eval import __version__

    out = {"version": __version__, "tasks": list(harness.tasks), "limit": harness.limit,
           "one_shot": {}, "finetuned": {}, "not_applicable": {}}
    parents = [setup.whole(i) for i in range(len(setup.models))]
    candidates = [("one_shot", f"parent_{i}", [m]) for i, m in enumerate(parents)]
    candidates += [("one_shot", "ensemble", parents)]
    candidates += [("one_shot", name, [m]) for name, m in fused.models.items()]
    candidates += [("finetuned", name, [m]) for name, m in tuned.models.items()]
    with quiet_and_seeded():
        for stage, name, models in candidates:
            with evaluating(models):  # HFLM puts the model in eval mode; evaluating puts it back after
                lm = language_model(models, harness.batch_size)
                try:
                    out[stage][name] = evaluate(lm, harness)
                except NotScored as why:
                    out["not_applicable"][name] = str(why)
                except AssertionError as err:  # lm-eval checks its requests with bare asserts
                    where = traceback.extract_tb(err.__traceback__)[-1]
                    raise TfuseError(f"eval.lm_eval: lm-eval's check failed scoring {name} "
                                     f"({Path(where.filename).name}:{where.lineno}: {where.line}); the model has "
                                     f"{lm.max_length} positions, and a longer continuation fails it: use tasks "
                                     "with shorter answers") from err
    return out


@contextmanager
def quiet_and_seeded() -> Iterator[None]:
    """lm-eval's per-request warnings silenced, and the seeds it sets undone afterwards (the
    stages after it draw from them)."""
    logger = logging.getLogger("lm_eval")
    level, states = logger.level, (random.getstate(), np.random.get_state())
    logger.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        logger.setLevel(level)
        random.setstate(states[0])
        np.random.set_state(states[1])
