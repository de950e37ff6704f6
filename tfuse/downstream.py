"""Downstream stage: finetune the parents, vanilla fusion and OT fusion with the same budget on a
sequence-classification task and score them (config group ``downstream``).

Every model becomes a sequence classifier (its family's ``to_classifier``) carrying its own encoder;
the pooler (MLM models have none) and the classifier start from one seeded initialisation shared by
all, so the models differ only in their encoder. Fused models enter as finetuned on MLM when that
stage ran.
"""
from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import nn

from tfuse.arch import text_family_for
from tfuse.errors import TfuseError
from tfuse.training import train

LABELS = {"vanilla": "VF", "ot": "OT"}


def build_downstream_task(cfg: DictConfig, tokenizer, eval_batch_size: int, device: str):
    from tfuse.tasks.text_classification import genre_task, glue_task

    kind = str(cfg.task).lower()
    if kind == "genre":
        return genre_task(cfg, tokenizer, eval_batch_size, device)
    return glue_task(cfg, tokenizer, eval_batch_size, device)


def run_downstream(
    cfg: DictConfig, parents: list[nn.Module], fused: dict[str, nn.Module], tuned: dict[str, nn.Module],
    device: str, console: Console,
) -> dict:
    d = cfg.downstream
    tokenizer = text_family_for(parents[0], "the downstream stage").tokenizer_of(parents[0])
    if tokenizer is None:
        raise TfuseError("the downstream stage needs the parents' tokenizer (saved beside their weights)")
    task = build_downstream_task(d, tokenizer, cfg.eval_batch_size, device)
    candidates = {f"parent_{i}": m for i, m in enumerate(parents)}
    source = {}
    for name, model in fused.items():
        candidates[name] = tuned.get(name, model)
        source[name] = "mlm_finetuned" if name in tuned else "one_shot"
    results, tuned_parents = {}, []
    for name, model in candidates.items():
        clf = text_family_for(model, "the downstream stage").to_classifier(model, task.num_labels, d.seed)
        stats = train(
            clf, task, steps=d.steps, lr=d.lr, batch_size=d.batch_size, seed=d.seed, warmup=d.warmup,
            schedule="cosine", weight_decay=d.weight_decay, device=device, description=f"downstream {name}",
        )
        results[name] = {**task.evaluate(clf, "test"), "train_loss": stats["final_loss"]}
        if name.startswith("parent_"):
            tuned_parents.append(clf)
    results["ensemble"] = task.evaluate_ensemble(tuned_parents, "test")
    out = {"task": task.name, "steps": d.steps, "fused_from": source, "test_size": len(task.data.test), "results": results}
    console.print(downstream_table(out))
    return out


def downstream_table(out: dict) -> Table:
    results = out["results"]
    metrics = [m for m in next(iter(results.values())) if m != "train_loss"]
    table = Table(title=f"downstream {out['task']}: every model finetuned {out['steps']} steps", title_justify="left")
    table.add_column("model")
    for m in metrics:
        table.add_column(m, justify="right")
    for name, scores in results.items():
        label = LABELS.get(name, name.replace("_", " "))
        table.add_row(label, *[f"{100 * scores[m]:.2f}%" if m in ("accuracy", "f1") else f"{scores[m]:.4f}" for m in metrics])
    return table
