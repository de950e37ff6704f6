"""The model card every fused model carries (``fused/README.md``, ``finetuned/README.md``): its
parents (source and sha256 of their weights), the resolved settings, the metrics, the tfuse
version and the command line that made it."""
from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from torch import nn

from tfuse.fusion.cache import tensors_sha256


def weights_sha256(source: str, model: nn.Module) -> tuple[str, str]:
    """(what was hashed, sha256): a local checkpoint's weight files, else the tensors themselves
    (a hub id: names, dtypes, shapes and bytes in name order)."""
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if files:
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return ", ".join(f.name for f in files), digest.hexdigest()
    return "tensors", tensors_sha256(model.state_dict())


def tfuse_version() -> str:
    try:
        return version("tfuse")
    except PackageNotFoundError:
        return "unknown"


def model_card(kind: str, name: str, label: str, results: dict, parents: list[dict], command: str) -> str:
    """Markdown for the ``kind`` ("fused" or "finetuned") model ``name`` of a run's ``results``."""
    heads = [f"- parent {i}: {p['head']}" for i, p in enumerate(parents) if p.get("head")]  # a headless one's, fitted
    lines = [
        f"# tfuse: {label} fusion of {len(parents)} parents ({kind})",
        "",
        f"Made by tfuse {tfuse_version()} with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Parents",
        "",
        "| parent | source | seed | sha256 of | sha256 |",
        "|---|---|---:|---|---|",
        *[f"| {i} | `{p['source']}` | {'' if p.get('seed') is None else p['seed']} | {p['hashed']} | `{p['sha256']}` |"
          for i, p in enumerate(parents)],
        *([""] + heads if heads else []),
        "",
        "## Metrics (test split; validation in parentheses)",
        "",
    ]
    stages = [("one-shot", "one_shot")] + ([("finetuned", "finetuned")] if kind == "finetuned" else [])
    for title, stage in stages:
        test, val = results.get(stage, {}).get(name, {}), results.get(f"{stage}_val", {}).get(name, {})
        cells = ", ".join(f"{metric} {value:.4g}" + (f" ({val[metric]:.4g})" if metric in val else "")
                          for metric, value in test.items())
        lines.append(f"- {title}: {cells}")
    partition = results.get("partition")
    if partition:
        knobs = ", ".join(f"{k} {v}" for k, v in partition.items() if k != "shards")
        lines += ["", f"## Training data of the parents (partition: {knobs})", "",
                  "| parent | examples | per class |", "|---|---:|---|",
                  *[f"| {i} | {shard['size']} | {' '.join(map(str, shard.get('classes', [])))} |"
                    for i, shard in enumerate(partition["shards"])]]
    lines += ["", "## Settings (`fusion`)", "", "```yaml", yaml.safe_dump(results["settings"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
