"""Resolve a flow graph and the residual / Q-K settings into the maps to compute.

Each logical space of the graph is served by one *resolved* space. A resolved space is
either solved by OT (``OTRule``), solved together with others head by head (``HeadRule``), or
combined from two earlier maps (``CombineRule``, residual policies). Its activations are
``segments``: neuron-axis blocks, each the sample-axis concatenation of some probes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.settings import FusionSettings

Segments = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class OTRule:
    name: str
    segments: Segments


@dataclass(frozen=True)
class HeadRule:
    """Head-aware maps: one map between heads shared by ``qk`` and ``v``, then maps inside heads."""

    qk: OTRule
    v: OTRule
    heads: int


@dataclass(frozen=True)
class CombineRule:
    """Stream point ``name`` from the maps of ``skip`` and ``branch`` (resolved names)."""

    name: str
    skip: str
    branch: str
    policy: str
    skip_probe: str
    branch_probe: str


Rule = OTRule | HeadRule | CombineRule


@dataclass
class Plan:
    rules: list[Rule]
    where: dict[str, tuple[str, int]]  # logical space -> (resolved space, segment index)
    segments: dict[str, Segments] = field(default_factory=dict)  # resolved OT space -> segments

    def ot_rules(self) -> list[OTRule]:
        out: list[OTRule] = []
        for rule in self.rules:
            if isinstance(rule, OTRule):
                out.append(rule)
            elif isinstance(rule, HeadRule):
                out += [rule.qk, rule.v]
        return out

    def probes(self) -> list[str]:
        """Every probe whose activations the rules read."""
        names: dict[str, None] = {}
        for rule in self.ot_rules():
            for seg in rule.segments:
                names.update(dict.fromkeys(seg))
        return list(names | dict.fromkeys(self.magnitude_probes()))

    def magnitude_probes(self) -> list[str]:
        """Probes whose mean absolute activation weighs a residual combination."""
        names: dict[str, None] = {}
        for rule in self.rules:
            if isinstance(rule, CombineRule) and rule.policy.startswith("weighted"):
                names.update(dict.fromkeys((rule.skip_probe, rule.branch_probe)))
        return list(names)


def make_plan(graph: FlowGraph, settings: FusionSettings) -> Plan:
    spaces = graph.spaces()
    where: dict[str, tuple[str, int]] = {}
    rules: dict[str, Rule] = {}
    residual_of = {r.out: r for r in graph.residuals}
    branches = {r.branch for r in graph.residuals}

    def ot(name: str, segments: Segments, *logical: str) -> None:
        rules[name] = OTRule(name, segments)
        for seg_index, space in enumerate(logical):
            where[space] = (name, seg_index if len(segments) > 1 else 0)

    for att in graph.attention:
        qk_name = f"{att.name}.qk"
        if settings.qk == "separate":
            ot(att.q, ((att.q,),), att.q)
            ot(att.k, ((att.k,),), att.k)
            ot(att.v, ((att.v,),), att.v)
        elif settings.qk == "eq_t_map":
            ot(qk_name, ((att.q, att.k),), att.q, att.k)
            ot(att.v, ((att.v,),), att.v)
        elif settings.qk == "joint":
            ot(qk_name, ((att.q,), (att.k,)), att.q, att.k)
            ot(att.v, ((att.v,),), att.v)
        else:
            rules[qk_name] = HeadRule(OTRule(qk_name, ((att.q, att.k),)), OTRule(att.v, ((att.v,),)), att.heads)
            where.update({att.q: (qk_name, 0), att.k: (qk_name, 0), att.v: (att.v, 0)})

    stream_points = [s for s in spaces if graph.is_stream(s)]
    if settings.residual == "global":
        ot(graph.stream, (tuple(stream_points),), *[])
        for space in stream_points + sorted(branches):
            where[space] = (graph.stream, 0)
    else:
        for space in stream_points:
            res = residual_of.get(space)
            if res is None:
                ot(space, ((space,),), space)
                continue
            for part in (res.skip, res.branch):
                if part not in where:
                    ot(part, ((part,),), part)
            rules[space] = CombineRule(
                space, where[res.skip][0], where[res.branch][0], settings.residual, res.skip, res.branch
            )
            where[space] = (space, 0)

    for space in spaces:
        if space not in where:
            ot(space, ((space,),), space)

    ordered = _in_forward_order(rules, where, spaces)
    plan = Plan(ordered, where)
    plan.segments = {r.name: r.segments for r in plan.ot_rules()}
    missing = sorted(p for p in plan.probes() if p not in graph.probes) if settings.cost == "activations" else []
    if missing:
        raise TfuseError(f"the flow graph has no probe for space(s) {', '.join(missing)}")
    return plan


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
                done.update(_names(rule))
            else:
                progressed.append(rule)
        if len(progressed) == len(pending):
            raise TfuseError("the flow graph's residual points form a cycle")
        pending = progressed
    return result


def _names(rule: Rule) -> tuple[str, ...]:
    if isinstance(rule, HeadRule):
        return (rule.qk.name, rule.v.name)
    return (rule.name,)
