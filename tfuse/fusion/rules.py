"""A plan's data: the maps to compute, rule by rule, and the builder that modes add rules through.

Each logical space of the graph is served by one *resolved* space. A resolved space is
either solved by OT (``OTRule``), solved together with others head by head (``HeadRule``), or
combined from two earlier maps (``CombineRule``, residual policies). Its activations are
``segments``: neuron-axis blocks, each the sample-axis concatenation of some probes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tfuse.errors import TfuseError
from tfuse.fusion.graph import Attention, Residual

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
class GroupedHeadRule:
    """Grouped heads (GQA, RoPE): one map between key/value groups, maps between the query heads
    inside matched groups and between value dimensions inside matched heads; Q/K dimensions stay
    in place under RoPE (its first ``rotary`` ones under partial RoPE). The output projection's
    space ``o`` follows from the query-head and value maps."""

    q: OTRule
    k: OTRule
    v: OTRule
    o: str | None
    heads: int
    kv_heads: int
    rope: bool
    rotary: int | None = None


@dataclass(frozen=True)
class CombineRule:
    """Stream point ``name`` from the maps of ``skip`` and ``branch`` (resolved names)."""

    name: str
    skip: str
    branch: str
    policy: str
    skip_probe: str
    branch_probe: str
    magnitudes: bool  # the policy weighs skip and branch by their probes' mean |activation|


Rule = OTRule | HeadRule | GroupedHeadRule | CombineRule


def rule_names(rule: Rule) -> tuple[str, ...]:
    """The resolved spaces whose maps ``rule`` gives."""
    if isinstance(rule, HeadRule):
        return (rule.qk.name, rule.v.name)
    if isinstance(rule, GroupedHeadRule):
        return tuple(n for n in (rule.q.name, rule.k.name, rule.v.name, rule.o) if n is not None)
    return (rule.name,)


@dataclass
class Plan:
    rules: list[Rule]
    where: dict[str, tuple[str, int]]  # logical space -> (resolved space, segment index)
    segments: dict[str, Segments] = field(default_factory=dict)  # resolved OT space -> segments
    signed: set[str] = field(default_factory=set)  # resolved spaces whose maps may flip signs

    def ot_rules(self) -> list[OTRule]:
        out: list[OTRule] = []
        for rule in self.rules:
            if isinstance(rule, OTRule):
                out.append(rule)
            elif isinstance(rule, HeadRule):
                out += [rule.qk, rule.v]
            elif isinstance(rule, GroupedHeadRule):
                out += [rule.q, rule.k, rule.v]
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
            if isinstance(rule, CombineRule) and rule.magnitudes:
                names.update(dict.fromkeys((rule.skip_probe, rule.branch_probe)))
        return list(names)


class PlanBuilder:
    """A plan under construction: what the Q/K modes and residual policies add rules through."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[str, int]] = {}
        self.rules: dict[str, Rule] = {}

    def ot(self, name: str, segments: Segments, *logical: str) -> None:
        """Resolved space ``name`` solved by OT on ``segments``, serving the ``logical`` spaces
        (one per segment when there are several)."""
        self.rules[name] = OTRule(name, segments)
        for index, space in enumerate(logical):
            self.where[space] = (name, index if len(segments) > 1 else 0)

    def heads(self, att: Attention) -> None:
        """Head-aware maps for one attention block (``HeadRule``)."""
        qk = f"{att.name}.qk"
        self.rules[qk] = HeadRule(OTRule(qk, ((att.q, att.k),)), OTRule(att.v, ((att.v,),)), att.heads)
        self.where.update({att.q: (qk, 0), att.k: (qk, 0), att.v: (att.v, 0)})

    def grouped_heads(self, att: Attention) -> None:
        """Grouped head maps for one attention block (``GroupedHeadRule``)."""
        kv = att.kv_heads or att.heads
        if att.heads % kv:
            raise TfuseError(f"attention '{att.name}': {att.heads} query heads do not divide into {kv} key/value groups")
        rule = GroupedHeadRule(OTRule(att.q, ((att.q,),)), OTRule(att.k, ((att.k,),)), OTRule(att.v, ((att.v,),)),
                               att.o, att.heads, kv, att.rope, att.rotary)
        self.rules[att.q] = rule
        for space in (att.q, att.k, att.v, att.o):
            if space is not None:
                self.where[space] = (space, 0)

    def combine(self, space: str, res: Residual, policy: str, magnitudes: bool) -> None:
        """Stream point ``space`` = skip + branch, its map combined from theirs by ``policy``
        (``magnitudes``: weighing them by their probes' mean |activation|)."""
        for part in (res.skip, res.branch):
            if part not in self.where:
                self.ot(part, ((part,),), part)
        skip, branch = self.where[res.skip][0], self.where[res.branch][0]
        self.rules[space] = CombineRule(space, skip, branch, policy, res.skip, res.branch, magnitudes)
        self.where[space] = (space, 0)
