"""Settings shared by every fusion method (config group ``fusion``): which method, the anchor
and weights, the calibration samples and the repair. A method's own knobs extend this class in
its module (``methods/ot.py``: ``OTSettings``); values are validated with messages that list
the allowed ones."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Collection, Sequence

from tfuse.errors import TfuseError, check_fusion_keys
from tfuse.fusion.tokens import TOKEN_FILTERS

REPAIRS = ("none", "rescale", "lstsq")
REPAIR_TARGETS = ("mean", "label", "confidence")  # how the aligned parents' outputs are weighed per sample
ALPHA_RULES = ("shard", "val")  # alpha resolved by the pipeline: by shard size, by validation score


@dataclass
class FusionSettings:
    """Every method's knobs; defaults are the paper's released ones except where noted."""

    CHOICES: ClassVar[dict[str, Collection[str]]] = {
        "tokens": TOKEN_FILTERS, "repair": REPAIRS, "repair_tokens": TOKEN_FILTERS, "repair_targets": REPAIR_TARGETS,
    }

    method: str = "ot"
    samples: int = 200  # calibration examples of the statistics
    batch_size: int = 50
    tokens: str = "window"  # which tokens are samples (tokens.py)
    window: int = 6
    token_count: int = 8
    anchor: int | str = 0
    alpha: Sequence[float] | str | None = None  # weights per parent, or shard | val (resolved by the pipeline)
    seed: int = 0
    repair: str = "none"  # after averaging: none | rescale (REPAIR) | lstsq (layer-wise ridge refit)
    repair_ridge: float = 1e-3  # lstsq: pull toward the fused weights, relative to mean diag(X^T X)
    repair_samples: int = 3000  # calibration examples of the repair (its own count)
    repair_tokens: str = "all"  # which tokens are the repair's samples (as ``tokens``)
    repair_targets: str = "mean"  # per sample, each aligned parent weighs alpha x: 1 (mean), p(label), top p (confidence)
    cache: bool = True  # reuse what an identical earlier pass computed (fusion/cache.py)
    cache_targets: bool = False  # also keep the repair's targets (disk: every repair sample's layer outputs)
    stream: bool = False  # walk the parents block by block from their safetensors checkpoints (stream.py)
    memory_gb: float | None = None  # fusion.stream: hidden states kept in memory (None: half the device's free memory)
    control: bool = True  # fuse the vanilla control too (false: skip it, large runs)

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise TfuseError(f"fusion.{key}={value!r} is not a known value; allowed: {', '.join(allowed)}")
        if self.samples < 1 or self.batch_size < 1:
            raise TfuseError("fusion.samples and fusion.batch_size must be at least 1")
        if not self.repair_ridge >= 0:
            raise TfuseError(f"fusion.repair_ridge={self.repair_ridge} must be 0 (plain least squares) or positive")
        if self.repair_samples < 1:
            raise TfuseError(f"fusion.repair_samples={self.repair_samples} must be at least 1")
        if self.repair_targets != "mean" and self.repair == "rescale":
            raise TfuseError(f"fusion.repair_targets={self.repair_targets} weighs each sample's target; it needs "
                             "fusion.repair=lstsq (rescale matches whole-split moments)")
        if isinstance(self.alpha, str) and self.alpha not in ALPHA_RULES:
            raise TfuseError(f"fusion.alpha={self.alpha!r}: give one weight per parent, or one of {', '.join(ALPHA_RULES)}")
        if self.memory_gb is not None and not self.memory_gb >= 0:
            raise TfuseError(f"fusion.memory_gb={self.memory_gb} must be 0 or more gigabytes (null: half the free memory)")
        if not (isinstance(self.anchor, int) or self.anchor == "best"):
            raise TfuseError(f"fusion.anchor={self.anchor!r}: give a parent index or 'best'")

    @classmethod
    def known(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_config(cls, data: dict[str, Any], ignore: Collection[str] = ()) -> "FusionSettings":
        """Build from a mapping, rejecting unknown keys by name; keys in ``ignore`` (other
        methods' knobs, present in a shared config group) are dropped."""
        data = {k: v for k, v in dict(data).items() if k not in ignore or k in cls.known()}
        check_fusion_keys(data, cls.known())  # one line naming the closest known settings
        if data.get("alpha") is not None and not isinstance(data["alpha"], str):
            data["alpha"] = [float(a) for a in data["alpha"]]
        return cls(**data)

    def weights(self, n_parents: int) -> list[float]:
        """Per-parent averaging weights (uniform unless ``alpha`` is given), summing to one."""
        if self.alpha is None:
            return [1.0 / n_parents] * n_parents
        if isinstance(self.alpha, str):
            raise TfuseError(f"fusion.alpha={self.alpha} is resolved by `tfuse fuse` (from the shards or the "
                             "validation scores); give the weights themselves here")
        if len(self.alpha) != n_parents or any(a < 0 for a in self.alpha) or sum(self.alpha) <= 0:
            raise TfuseError(
                f"fusion.alpha={list(self.alpha)} needs {n_parents} non-negative weights, one per parent"
            )
        total = sum(self.alpha)
        return [a / total for a in self.alpha]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alpha"] = list(self.alpha) if isinstance(self.alpha, (list, tuple)) else self.alpha
        return out
