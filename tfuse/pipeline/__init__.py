"""`tfuse fuse` and `tfuse train`. A fusion run is a sequence of stages, each a function of the
previous ones' output: prepare (settings, task, parents) -> score_parents (and the anchor) ->
fuse_parents (the method and its vanilla control) -> interpolate (eval.interpolation's loss
barriers) -> finetune_all (with controls) -> collect_results -> lm-evaluation-harness
(eval.lm_eval) -> save_models.

The stages are in :mod:`.stages`, except interpolate (:mod:`.interpolation`), finetune_all
(:mod:`.finetune`), lm-evaluation-harness (:mod:`.harness`) and save_models (:mod:`.save`); what
they hand on in :mod:`.state`; per-class scores in :mod:`.scores`, the printed tables in
:mod:`.tables`, device, seeds and clock in :mod:`.runtime`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from tfuse.config_keys import fusion_sources, sources_summary
from tfuse.downstream import run_downstream
from tfuse.errors import TfuseError
from tfuse.fusion.settings import FusionSettings
from tfuse.io import write_json
from tfuse.parents import partition_of, save_parent, train_parent
from tfuse.pipeline.finetune import finetune_all, finetune_options
from tfuse.pipeline.harness import Harness, harness_scores
from tfuse.pipeline.interpolation import interpolate, lambdas_of
from tfuse.pipeline.runtime import Stopwatch, resolve_device, seed_everything
from tfuse.pipeline.save import save_models
from tfuse.pipeline.stages import collect_results, fuse_parents, prepare, score_parents
from tfuse.pipeline.tables import barrier_table, continuation_table, harness_table, results_table
from tfuse.tasks import build_task


def run_fuse(cfg: DictConfig, out_dir: Path, console: Console) -> dict:
    """The whole fusion experiment, stage by stage; writes results.json, fused/ and finetuned/
    into ``out_dir``."""
    if (out_dir / "results.json").exists():
        raise TfuseError(f"'{out_dir}' already holds results.json; choose another hydra.run.dir")
    finetune_options(cfg)  # a bad finetune or interpolation value ends the run before the fusion, not after
    lambdas_of(cfg)
    harness = Harness.from_config(cfg)
    clock = Stopwatch()
    setup = prepare(cfg, clock)
    baseline = score_parents(setup, clock)
    fused = fuse_parents(setup, baseline, clock)
    interpolation = interpolate(setup, baseline, fused, clock, out_dir)
    tuned = finetune_all(setup, baseline, fused, clock)
    results = collect_results(setup, baseline, fused, tuned, clock, out_dir)
    if interpolation is not None:
        results["interpolation"] = interpolation
    if harness is not None:
        with clock.stage("lm_eval"):
            results["lm_eval"] = harness_scores(harness, setup, fused, tuned)
    setup.release()
    results["fusion_settings"] = settings_in_force(setup.settings)
    if cfg.get("downstream") and cfg.downstream.get("task"):
        with clock.stage("downstream"):
            results["downstream"] = run_downstream(cfg, setup.models, fused.models, tuned.models, setup.device, console)
        setup.release()
    save_models(setup, fused, tuned, results, out_dir)
    write_json(out_dir / "results.json", results)
    console.print(results_table(results))
    if "continuations" in results:
        console.print(continuation_table(results["continuations"]))
    if "interpolation" in results:
        console.print(barrier_table(results["interpolation"]))
    if "lm_eval" in results:
        console.print(harness_table(results["lm_eval"]))
    console.print(sources_summary(results["fusion_settings"]), markup=False, highlight=False, soft_wrap=True)
    return results


def settings_in_force(settings: FusionSettings) -> dict[str, dict]:
    """results.json ``fusion_settings``: each setting's value and where it came from (the
    command line, the experiment, the package defaults), from the Hydra run's overrides and choices."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return fusion_sources(settings.as_dict(), None, {})
    hydra = HydraConfig.get()
    return fusion_sources(settings.as_dict(), list(hydra.overrides.task), dict(hydra.runtime.choices))


def run_train(cfg: DictConfig, out_dir: Path, console: Console) -> dict:
    """One parent from scratch with ``seed``; saved to ``out_dir/model`` beside its metrics."""
    if not partition_of(cfg).iid:
        raise TfuseError(f"partition={partition_of(cfg).kind}: tfuse train trains one parent on the whole training "
                         "split; partitions deal shards to tfuse fuse's recipe parents (drop the override)")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    task = build_task(cfg.data, cfg.eval_batch_size, device, family_name=cfg.model.family, evaluation=cfg.get("eval"))
    model, metrics = train_parent(cfg, task, cfg.seed, device)
    save_parent(model, cfg, metrics, cfg.seed, out_dir / "model")
    write_json(out_dir / "metrics.json", metrics)
    console.print(
        f"parent (seed {cfg.seed}): test {task.primary_metric} {metrics['test'][task.primary_metric]:.4f}, "
        f"saved to {out_dir / 'model'}"
    )
    return metrics
