"""The tables a fusion run prints: every model's scores, and a causal LM's continuations and
lm-evaluation-harness scores."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from tfuse.fusion.methods import label_of


def results_table(results: dict) -> Table:
    """Models as rows; one-shot and finetuned metrics as columns."""
    one_shot, tuned = results["one_shot"], results["finetuned"]
    metrics = list(next(iter(one_shot.values())))
    title = Text("tfuse: one-shot and finetuned (VF: vanilla fusion, OT: OT fusion)", no_wrap=True, overflow="ignore")
    table = Table(title=title, title_justify="left")  # the title on one line, however narrow the table
    table.add_column("model")
    for m in metrics:
        table.add_column(f"one-shot {m}", justify="right")
    for m in metrics if tuned else []:
        table.add_column(f"finetuned {m}", justify="right")
    beat = results.get("steps_to_beat_best_parent")
    if beat:
        table.add_column("steps until above the best parent (val)", justify="right")
    shards = results.get("by_shard", {})
    count = len(next(iter(shards.values()))) if shards else 0
    for i in range(count):  # what a fused model must combine: each parent's own classes, and the rest
        table.add_column(f"own {i}", justify="right")
        table.add_column(f"rest {i}", justify="right")
    for name in [*one_shot, *(n for n in tuned if n not in one_shot)]:
        scores = one_shot.get(name, {})
        row = [label_of(name)] + [_fmt(m, scores[m]) if m in scores else "" for m in metrics]
        if tuned:
            row += [_fmt(m, tuned[name][m]) if name in tuned else "" for m in metrics]
        if beat:
            row.append("" if name not in beat else "never" if beat[name] is None else str(beat[name]))
        for part in shards.get(name, [{}] * count):
            row += ["" if part.get(k) is None else f"{100 * part[k]:.1f}%" for k in ("own", "rest")]
        table.add_row(*row)
    for name, why in results.get("not_applicable", {}).items():
        table.add_row(label_of(name), *[f"n/a: {why}" if i == 0 else "" for i in range(len(table.columns) - 1)])
    return table


def barrier_table(found: dict) -> Table:
    """Each method's loss barriers (``results["interpolation"]``), per moved parent."""
    half = any("barrier_at_half" in m for m in found["methods"].values())
    table = Table(title=f"loss barriers on the {found['split']} split (lambda {found['lambdas']})", title_justify="left")
    for column in ["method", "parent", "barrier", *(["at lambda 0.5"] if half else []), "fused model's excess"]:
        table.add_column(column, justify="left" if column in ("method", "parent") else "right")
    for name, method in found["methods"].items():
        for parent, value in method["barrier"].items():
            row = [label_of(name), parent, f"{value:.4f}"]
            if half:
                row.append(f"{method['barrier_at_half'][parent]:.4f}")
            table.add_row(*row, f"{method['midpoint_barrier']:.4f}" + (" (repaired)" if method["repaired"] else ""))
    return table


def harness_table(found: dict) -> Table:
    """lm-evaluation-harness's scores (``results["lm_eval"]``): models as rows, each task's metrics
    (not their standard errors) one-shot and finetuned as columns."""
    stages = [s for s in ("one_shot", "finetuned") if found[s]]
    names = [*found["one_shot"], *(n for n in found["finetuned"] if n not in found["one_shot"])]
    columns = sorted({(task, metric) for scores in found[stages[0]].values() for task, metrics in scores.items()
                      for metric in metrics if "_stderr" not in metric})
    title = f"lm-evaluation-harness {found['version']} on {', '.join(found['tasks'])} (limit {found['limit']})"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    tasks = len({task for task, _ in columns}) > 1
    for stage in stages:
        for task, metric in columns:
            table.add_column(" ".join([stage.replace("_", "-"), *([task] if tasks else []), metric]), justify="right")
    for name in names:
        row = [label_of(name)]
        for stage in stages:
            scores = found[stage].get(name, {})
            row += [_fmt(metric, scores[task][metric]) if metric in scores.get(task, {}) else ""
                    for task, metric in columns]
        table.add_row(*row)
    for name, why in found["not_applicable"].items():
        table.add_row(label_of(name), f"n/a: {why}", *[""] * (len(table.columns) - 2))
    return table


def continuation_table(found: dict) -> Table:
    """Each model's greedy continuation of the prompt, one-shot and finetuned."""
    table = Table(title=f"greedy continuations of {found['prompt']!r}", title_justify="left")
    table.add_column("model")
    table.add_column("one-shot")
    if found["finetuned"]:
        table.add_column("finetuned")
    for name in [*found["one_shot"], *(n for n in found["finetuned"] if n not in found["one_shot"])]:
        row = [label_of(name), repr(found["one_shot"].get(name, ""))]
        table.add_row(*row, *([repr(found["finetuned"].get(name, ""))] if found["finetuned"] else []))
    return table


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}"
