"""Q/K modes (``fusion.qk``): how the query, key and value spaces of an attention block are
mapped. Each mode adds the block's rules to a plan under construction (``rules.PlanBuilder``)."""
from __future__ import annotations

from typing import Callable

from tfuse.errors import TfuseError
from tfuse.fusion.graph import Attention
from tfuse.fusion.registry import Registry
from tfuse.fusion.rules import PlanBuilder

QKMode = Callable[[PlanBuilder, Attention], None]
QK_MODES: Registry[QKMode] = Registry("qk")


def _whole_heads(att: Attention, mode: str) -> None:
    """Modes that move single Q/K dimensions cannot serve RoPE or grouped key/value heads."""
    if att.grouped:
        why = "RoPE rotates Q/K dimensions in fixed pairs" if att.rope else "its key/value heads are grouped"
        raise TfuseError(f"fusion.qk={mode} moves single dimensions, but in attention '{att.name}' {why}; "
                         "use fusion.qk=head_aware")


@QK_MODES.register("separate")
def _separate(plan: PlanBuilder, att: Attention) -> None:
    """Q, K and V each their own map (the paper's released default)."""
    _whole_heads(att, "separate")
    for space in (att.q, att.k, att.v):
        plan.ot(space, ((space,),), space)


@QK_MODES.register("eq_t_map")
def _eq_t_map(plan: PlanBuilder, att: Attention) -> None:
    """One map for Q and K from their activations side by side (Q K^T is preserved)."""
    _whole_heads(att, "eq_t_map")
    plan.ot(f"{att.name}.qk", ((att.q, att.k),), att.q, att.k)
    plan.ot(att.v, ((att.v,),), att.v)


@QK_MODES.register("joint")
def _joint(plan: PlanBuilder, att: Attention) -> None:
    """One map for Q and K from their samples stacked (Q and K as two views of one space)."""
    _whole_heads(att, "joint")
    plan.ot(f"{att.name}.qk", ((att.q,), (att.k,)), att.q, att.k)
    plan.ot(att.v, ((att.v,),), att.v)


@QK_MODES.register("head_aware")
def _head_aware(plan: PlanBuilder, att: Attention) -> None:
    """Heads matched as wholes (Q/K and V share the head map), then dimensions inside heads
    (grouped heads: groups, then query heads inside groups; Q/K dimensions fixed under RoPE)."""
    if att.grouped:
        plan.grouped_heads(att)
    else:
        plan.heads(att)
