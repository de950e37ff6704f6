"""Fusion settings (config group ``fusion``), validated with messages that list allowed values."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from tfuse.errors import TfuseError

CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("ot", "vanilla"),
    "cost": ("activations", "weights"),
    "solver": ("emd", "sinkhorn"),
    "metric": ("euclidean", "sqeuclidean", "cosine"),
    "normalize_cost": ("max", "median", "mean", "none"),
    "tokens": ("all", "cls", "window", "random"),
    "residual": ("no_resid", "only_resid", "mean", "weighted_scalar", "weighted_matrix", "global"),
    "qk": ("separate", "eq_t_map", "joint", "head_aware"),
    "repair": ("none", "rescale", "lstsq"),
    "repair_tokens": ("all", "cls", "window", "random"),
}

DEFAULT_REG = {"activations": 0.08, "weights": 0.06}


@dataclass
class FusionSettings:
    """Every knob of OT fusion; defaults are the paper's released ones except where noted."""

    method: str = "ot"
    cost: str = "activations"
    solver: str = "sinkhorn"
    reg: float | None = None  # None: 0.08 with activations, 0.06 with weights
    metric: str = "euclidean"
    normalize_cost: str = "max"
    center: bool = False
    standardize: bool = False
    unit_norm: bool = False
    samples: int = 200
    batch_size: int = 50
    tokens: str = "window"
    window: int = 6
    token_count: int = 8
    residual: str = "mean"
    qk: str = "separate"
    anchor: int | str = 0
    alpha: Sequence[float] | None = None
    iterations: int = 1
    sinkhorn_iters: int = 2000
    sinkhorn_tol: float = 1e-2  # largest relative marginal error accepted from Sinkhorn
    seed: int = 0
    repair: str = "none"  # after averaging: none | rescale (REPAIR) | lstsq (layer-wise ridge refit)
    repair_ridge: float = 1e-3  # lstsq: pull toward the fused weights, relative to mean diag(X^T X)
    repair_samples: int = 3000  # calibration examples of the repair (its own count)
    repair_tokens: str = "all"  # which tokens are the repair's samples (as ``tokens``)

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise TfuseError(
                    f"fusion.{key}={value!r} is not a known value; allowed: {', '.join(allowed)}"
                )
        if self.reg is None:
            self.reg = DEFAULT_REG[self.cost]
        if self.solver == "sinkhorn" and not self.reg > 0:
            raise TfuseError(f"fusion.reg={self.reg} must be positive for fusion.solver=sinkhorn")
        if self.samples < 1 or self.batch_size < 1:
            raise TfuseError("fusion.samples and fusion.batch_size must be at least 1")
        if not self.repair_ridge >= 0:
            raise TfuseError(f"fusion.repair_ridge={self.repair_ridge} must be 0 (plain least squares) or positive")
        if self.repair_samples < 1:
            raise TfuseError(f"fusion.repair_samples={self.repair_samples} must be at least 1")
        if self.iterations < 1:
            raise TfuseError(f"fusion.iterations={self.iterations} must be at least 1")
        if not (isinstance(self.anchor, int) or self.anchor == "best"):
            raise TfuseError(f"fusion.anchor={self.anchor!r}: give a parent index or 'best'")
        if self.cost == "weights" and self.residual.startswith("weighted"):
            raise TfuseError(
                f"fusion.residual={self.residual} weighs the stream by activation magnitudes; "
                "use fusion.cost=activations or another residual policy"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> "FusionSettings":
        """Build from a mapping (an OmegaConf node), rejecting unknown keys by name."""
        data = dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TfuseError(
                f"unknown fusion setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if data.get("alpha") is not None:
            data["alpha"] = [float(a) for a in data["alpha"]]
        return cls(**data)

    def weights(self, n_parents: int) -> list[float]:
        """Per-parent averaging weights (uniform unless ``alpha`` is given), summing to one."""
        if self.alpha is None:
            return [1.0 / n_parents] * n_parents
        if len(self.alpha) != n_parents or any(a < 0 for a in self.alpha) or sum(self.alpha) <= 0:
            raise TfuseError(
                f"fusion.alpha={list(self.alpha)} needs {n_parents} non-negative weights, one per parent"
            )
        total = sum(self.alpha)
        return [a / total for a in self.alpha]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alpha"] = list(self.alpha) if self.alpha is not None else None
        return out
