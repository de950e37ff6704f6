"""Make a plan: resolve a flow graph and the residual / Q-K settings into the rules of
``rules.py``, in forward order, and check that the graph has the probes they read."""
from __future__ import annotations

from typing import Protocol

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.qk import QK_MODES
from tfuse.fusion.residual import RESIDUALS
from tfuse.fusion.rules import CombineRule, Plan, PlanBuilder, rule_names


class PlanSettings(Protocol):
    """The knobs a plan reads; ``OTSettings`` satisfies it."""

    qk: str
    residual: str


def make_plan(graph: FlowGraph, settings: PlanSettings) -> Plan:
    """The rules for ``graph`` under the settings' Q/K mode and residual policy, in forward order."""
    builder = PlanBuilder()
    for att in graph.attention:
        QK_MODES[settings.qk](builder, att)
    RESIDUALS[settings.residual].plan(builder, graph)
    spaces = graph.spaces()
    for space in spaces:
        if space not in builder.where:
            builder.ot(space, ((space,),), space)
    plan = Plan(_in_forward_order(builder.rules, builder.where, spaces), builder.where)
    plan.segments = {r.name: r.segments for r in plan.ot_rules()}
    served: dict[str, list[str]] = {}
    for space, (name, _) in builder.where.items():
        served.setdefault(name, []).append(space)
    plan.signed = {name for name, logical in served.items() if all(s in graph.signed for s in logical)}
    return plan


def check_probes(plan: Plan, graph: FlowGraph) -> None:
    """Every probe the plan reads exists (activation costs)."""
    missing = sorted(p for p in plan.probes() if p not in graph.probes)
    if missing:
        raise TfuseError(f"the flow graph has no probe for space(s) {', '.join(missing)}")


def _in_forward_order(rules: dict[str, Rule], where: dict[str, tuple[str, int]], spaces: list[str]) -> list[Rule]:
    """Rules sorted by the first logical space they serve (combines after their inputs)."""
    first: dict[str, int] = {}
    for index, space in enumerate(spaces):
        first.setdefault(where[space][0], index)
    for space, (name, _) in where.items():
        first.setdefault(name, len(spaces))

    def key(item: tuple[str, Rule]) -> tuple[int, int]:
        name, rule = item
        return (first.get(name, len(spaces)), 1 if isinstance(rule, CombineRule) else 0)

    ordered = [rule for _, rule in sorted(rules.items(), key=key)]
    done: set[str] = set()
    result: list[Rule] = []
    pending = ordered
    while pending:
        progressed = []
        for rule in pending:
            deps = (rule.skip, rule.branch) if isinstance(rule, CombineRule) else ()
            if all(d in done for d in deps):
                result.append(rule)
                done.update(rule_names(rule))
            else:
                progressed.append(rule)
        if len(progressed) == len(pending):
            raise TfuseError("the flow graph's residual points form a cycle")
        pending = progressed
    return result


