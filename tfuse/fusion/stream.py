"""Streamed OT fusion: the parents walked part by part from their checkpoints, so that a model
of any size fuses with the fused model and one part of each parent resident.

A model's *parts* follow its flow graph: the repeated blocks (``FlowGraph.blocks``) and the
parameters outside them (embeddings, final norm, head). Blocks are walked the way quantisers
walk them (GPTQ): every model keeps its hidden states for the calibration batches at the current
block boundary (``boundary.py``: device, host or disk by ``fusion.memory_gb``), runs one block
on them and moves on.

*Pass 1* runs the part before the first block (every block a stand-in that records the
arguments the model gives it, so per-block masks stay right), each block in turn, and the part
after the last block only as far as a probe reads (no logits). Each part's probes feed the
streamed statistics (``statistics.py``), each rule whose probes have all run is solved at once
and its statistics freed; rules over every block (``residual=global``) are solved after the
last. Maps are kept compactly (``compact.py``). *Pass 2* aligns and averages each part of the
parents into the anchor's skeleton, which becomes the fused model.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Iterable, Sequence

import torch

from tfuse.checkpoint import LazyModel
from tfuse.errors import TfuseError
from tfuse.fusion.blockwise import align_and_repair
from tfuse.fusion.boundary import BoundaryCache, default_budget
from tfuse.fusion.compact import CompactMaps, sign_flips
from tfuse.fusion.cost import COSTS
from tfuse.fusion.engine import FusionOutcome, check_fixed_axes, check_graph, timed
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.maps import compute_maps
from tfuse.fusion.plan import check_probes, make_plan
from tfuse.fusion.recorder import Recorder
from tfuse.fusion.rules import CombineRule, Plan, Rule
from tfuse.fusion.statistics import (
    Moments, Probing, _check_finite, _ParentStatistics, _steady_allocator, _virtual_state, batch_mask, release_heap,
)
from tfuse.fusion.walk import OUTER, Walk, part_of
from tfuse.progress import track

Batch = dict[str, torch.Tensor]


def _rule_probes(rule: Rule) -> set[str]:
    """The probes a rule reads (a combination: its magnitudes' only)."""
    if isinstance(rule, CombineRule):
        return {rule.skip_probe, rule.branch_probe} if rule.magnitudes else set()
    return set(Plan([rule], {}).probes())


def _rule_needs(rule: Rule) -> set[str]:
    return {rule.skip, rule.branch} if isinstance(rule, CombineRule) else set()


def _rule_names(rule: Rule) -> list[str]:
    return [r.name for r in Plan([rule], {}).ot_rules()]


def stream_fuse(
    parents: Sequence[LazyModel],
    graph: FlowGraph,
    settings,
    anchor: int,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    total: int | None = None,
    memory_bytes: int | None = None,
    repair_calibration: Callable[[], Iterable[Batch]] | None = None,
    aligned: bool = True,
    competence: Callable | None = None,
) -> FusionOutcome:
    """OT fusion of checkpoints read part by part (``settings``: ``OTSettings``), or with
    ``aligned=False`` vanilla fusion (the parents averaged as they are: the control, repaired
    alike; ``FusionSettings`` suffice); the anchor's skeleton becomes the fused model.
    ``competence``: the task's per-sample scores, for ``repair_targets`` other than ``mean``."""
    _check(parents, graph, settings, anchor, aligned)
    models = [p.model for p in parents]
    plan = make_plan(graph, settings) if aligned else None
    if aligned:
        check_probes(plan, graph)
    device = torch.device(parents[anchor].device)
    budget = memory_bytes if memory_bytes is not None else default_budget(device)
    timings: dict[str, float] = {}
    cache = BoundaryCache(device, budget)
    try:
        for m in models:
            m.eval()
        maps: list = [None] * len(parents)
        info: dict = {}
        if aligned:
            with torch.no_grad():
                maps, info = _pass_one(parents, graph, plan, settings, anchor, calibration, model_inputs, total, cache,
                                       timings)
            cache.close()
            release_heap()  # pass 1's statistics are gone: pass 2 builds the fused model in their room
        stage = "align" if settings.repair == "none" else "repair"  # with a repair, one walk aligns and refits
        with torch.no_grad(), timed(timings, stage, models[anchor]):
            fits = align_and_repair(parents, graph, plan, maps, anchor, settings, repair_calibration or calibration,
                                    model_inputs, cache, competence)
    finally:
        cache.close()
    info["boundary_cache"] = {"budget_bytes": budget}
    return FusionOutcome(models[anchor], [m if m is not None else {} for m in maps], timings, fits, info)


def _check(parents: Sequence[LazyModel], graph: FlowGraph, settings, anchor: int, aligned: bool) -> None:
    """What streaming supports, and parents the graph describes (one line otherwise)."""
    if aligned and settings.iterations != 1:
        raise TfuseError(f"fusion.stream fuses in one pass: fusion.iterations={settings.iterations} must be 1")
    if aligned and not COSTS[settings.cost].needs_statistics:
        raise TfuseError(f"fusion.stream aligns on activations: fusion.cost={settings.cost} needs whole models; "
                         "use fusion.cost=activations")
    if not graph.blocks:
        raise TfuseError("fusion.stream: the flow graph lists no blocks to walk")
    models = [p.model for p in parents]
    for i, m in enumerate(models):
        check_graph(m, graph, f"parent {i}")
    check_fixed_axes(models, graph, anchor)
    if not aligned and any(p.shape != q.shape for m in models for p, q in zip(m.parameters(), models[anchor].parameters())):
        raise TfuseError("vanilla fusion needs parents of identical architectures (widths differ)")


def _pass_one(parents, graph, plan, settings, anchor, calibration, model_inputs, total, cache, timings):
    """Statistics part by part, each rule solved once its probes have all run; the maps, and what
    the method reports (statistics source, sign flips)."""
    _steady_allocator()
    spaces = plan.segments
    probing = Probing.of(graph, plan)
    movers = [i for i in range(len(parents)) if i != anchor]
    walks = {i: Walk(parents[i], graph, cache, i) for i in range(len(parents))}
    recorders = {i: Recorder(parents[i].model, probing.probes, probing.names) for i in walks}
    sums = settings.center or settings.standardize
    ref_moments: dict[str, Moments] = {}
    stats = {i: _ParentStatistics(spaces, ref_moments, plan.magnitude_probes(), sums, probing.source_of) for i in movers}
    maps = {i: CompactMaps() for i in movers}
    generator = torch.Generator().manual_seed(settings.seed)
    inputs: list[Batch] = []
    masks = []
    done: set[str] = set()
    pending = list(plan.rules)
    solved: set[str] = set()
    blocks = graph.blocks
    outer = [n for n in parents[anchor].names() if part_of(n, blocks) == OUTER]
    in_part = {k + 1: [n for n in parents[anchor].names() if part_of(n, blocks) == k + 1] for k in range(len(blocks))}

    probe_part = {n: part_of(probing.probes[n].module, blocks) for n in probing.names}

    def accumulate(b: int, part: int, run: Callable[[int], None]) -> set[str]:
        """One part of batch ``b``: the anchor's samples, then each mover's against them."""
        only = {n for n, p in probe_part.items() if p == part}
        with recorders[anchor].recording(masks[b], only=only) as ref_acts:
            run(anchor)
        fired = set(ref_acts)
        feats, ref_sources = probing.reference(ref_acts, spaces, ref_moments, sums)
        for i in movers:
            stats[i].start_batch(feats, ref_sources)
            with recorders[i].recording(masks[b], stats[i].add, only):
                run(i)
            stats[i].finish_batch()
        return fired

    def solve_ready() -> None:
        progress = True
        while progress:
            progress = False
            for rule in list(pending):
                if not (_rule_probes(rule) <= done and _rule_needs(rule) <= solved):
                    continue
                with timed(timings, "transport", parents[anchor].model):
                    for i in movers:
                        compute_maps(plan, graph, settings, stats[i].pairs, stats[i].magnitude(), {}, {},
                                     rules=[rule], maps=maps[i])
                for name in _rule_names(rule):
                    for i in movers:
                        stats[i].pairs.pop(name, None)
                    ref_moments.pop(name, None)
                solved.update(maps[movers[0]].raw)
                pending.remove(rule)
                progress = True

    def finish_part(fired: set[str]) -> None:
        ref_state = _virtual_state(parents[anchor].model, graph)
        here = {n for n in probing.sources if n in fired}
        for i in movers:
            stats[i].derive(_virtual_state(parents[i].model, graph), ref_state, graph.probes, here)
            for n in here:
                stats[i].source_pairs.pop(n, None)
        for n in here:
            ref_moments.pop(n, None)
        _check_finite([stats[i].pairs for i in movers], ref_moments, graph)
        done.update(fired)
        solve_ready()

    with ExitStack() as stack:
        for rec in recorders.values():
            stack.enter_context(rec.attached())
        for p in parents:
            p.load_buffers()
            p.load(outer)
        fired: set[str] = set()
        timings.update(statistics=0.0, transport=0.0)
        with timed(timings, "statistics", parents[anchor].model):
            for batch in track(calibration(), "statistics: before the blocks", total=total):
                inputs.append(model_inputs(batch))
                masks.append(batch_mask(batch, graph, settings, generator))
                b = len(inputs) - 1
                fired |= accumulate(b, OUTER, lambda i: walks[i].before(b, inputs[b]))
            if not inputs:
                raise TfuseError("fusion.stream needs calibration data (fusion.samples >= 1)")
        for p in parents:
            p.release(outer)
        finish_part(fired)
        for k in track(range(len(blocks)), "streamed statistics, block by block", total=len(blocks)):
            for p in parents:
                p.load(in_part[k + 1])
            fired = set()
            with timed(timings, "statistics", parents[anchor].model):
                for b in range(len(inputs)):
                    fired |= accumulate(b, k + 1, lambda i: walks[i].block(k, b))
            finish_part(fired)
            for p in parents:
                p.release(in_part[k + 1])
        later = {graph.probes[n].module: graph.probes[n].where for n in probing.names if n not in done}
        if later:
            for p in parents:
                p.load(outer)
            fired = set()
            with timed(timings, "statistics", parents[anchor].model):
                for b in range(len(inputs)):
                    fired |= accumulate(b, OUTER, lambda i: walks[i].after(b, inputs[b], later))
            for p in parents:
                p.release(outer)
            finish_part(fired)
    if pending:
        raise TfuseError(f"the forward pass did not reach every probe of space '{_rule_names(pending[0]) or pending[0]}'")
    info: dict = {"statistics": ["computed"]}
    if settings.signs and plan.signed:
        info["sign_flips"] = [sign_flips(m, plan.signed) for m in maps.values()]
    return [maps.get(i) for i in range(len(parents))], info
