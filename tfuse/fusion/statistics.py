"""Streamed activation statistics: per-neuron sums, sums of squares and cross-products.

For every resolved OT space and every (model, reference) pair, the statistics are accumulated
batch by batch, so memory depends on the widths and the batch size, never on the number of
calibration samples. Costs are computed from these sums alone (``cost.py``).

Where several probes are affine images of one tensor (``Linear``: Q, K and V of the normalised
stream), their cross-products with the reference are not summed sample by sample: the source's
is, once, and each probe's follows from it and the weights after the pass.
"""
from __future__ import annotations

import ctypes
from collections import Counter
from contextlib import ExitStack
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph, Linear, Probe
from tfuse.fusion.recorder import Recorder, kept_rows
from tfuse.fusion.rules import Plan, Segments
from tfuse.fusion.tokens import TokenSettings, token_mask
from tfuse.progress import track

Batch = dict[str, torch.Tensor]


class StatisticsSettings(TokenSettings, Protocol):
    """The knobs the statistics read (with the token filter's); ``OTSettings`` satisfies it."""

    seed: int
    center: bool
    standardize: bool


@dataclass
class Moments:
    """Per-neuron sums over samples of one model's activations in one space. The plain sums are
    kept only where the cost centres or standardises (``sum`` is None otherwise)."""

    count: int
    sum: torch.Tensor | None
    sumsq: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device, sums: bool = True) -> "Moments":
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(0, z.clone() if sums else None, z)

    def add(self, x: torch.Tensor) -> None:
        self.count += x.shape[0]
        if self.sum is not None:
            self.sum += x.sum(0)  # float32 within a batch, float64 across batches
        self.sumsq += (x * x).sum(0)


@dataclass
class PairStats:
    """Everything a cost between model ``a`` and reference ``b`` needs, for one space."""

    a: Moments
    b: Moments
    cross: torch.Tensor  # (n_a, n_b) float32: sum over samples of a_i * b_j


@dataclass
class Statistics:
    pairs: list[dict[str, PairStats]]  # per model: resolved space -> stats against the reference
    magnitude: list[dict[str, torch.Tensor]]  # per model: probe -> mean |activation| per neuron


def block_probes(segments: Segments) -> list[tuple[str, ...]]:
    """The probes of each sample block of a space: block b is probe b of every segment."""
    return list(zip(*segments))


def join(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One sample block from its probes' samples, side by side along neurons."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


def derived_blocks(graph: FlowGraph, spaces: dict[str, Segments]) -> dict[tuple[str, int], Probe]:
    """Sample blocks whose cross-products follow from a source's: (space, block) -> source.

    A block qualifies when all its probes are ``Linear`` images of one source that feeds more
    than one probe (a single image is cheaper to multiply directly)."""
    def source(probe: str) -> Probe | None:
        link = graph.probes[probe].linear
        return None if link is None else link.source

    blocks = [(space, b, probes) for space, segments in spaces.items() for b, probes in enumerate(block_probes(segments))]
    feeds = Counter(source(p) for _, _, probes in blocks for p in dict.fromkeys(probes))
    out = {}
    for space, b, probes in blocks:
        sources = {source(p) for p in probes}
        if len(sources) == 1 and None not in sources and feeds[next(iter(sources))] > 1:
            out[space, b] = next(iter(sources))
    return out


@dataclass
class Probing:
    """What a statistics pass records: the plan's probes and, per ``derived_blocks``, the sources
    whose cross-products stand in for their affine images' (``source.N``)."""

    derived: dict[tuple[str, int], Probe]
    source_of: dict[tuple[str, int], str]  # (space, block) -> its source's name
    sources: dict[str, Probe]  # name -> source probe
    names: list[str]  # every probe a recorder keeps
    probes: dict[str, Probe]  # the graph's probes and the sources, by name

    @classmethod
    def of(cls, graph: FlowGraph, plan: Plan) -> "Probing":
        derived = derived_blocks(graph, plan.segments)
        source_names = {src: f"source.{i}" for i, src in enumerate(dict.fromkeys(derived.values()))}
        sources = {name: src for src, name in source_names.items()}
        return cls(derived, {key: source_names[src] for key, src in derived.items()}, sources,
                   plan.probes() + list(sources), {**graph.probes, **sources})

    def reference(self, acts: dict[str, torch.Tensor], spaces: dict[str, Segments], moments: dict[str, Moments],
                  sums: bool) -> tuple[dict, dict[str, torch.Tensor]]:
        """The reference's samples of one run into its moments; the sample blocks of each space
        whose probes ran (None for a block that did not, or whose source stands in for it) and the
        sources' samples, for the models' cross-products."""
        feats = {}
        for space, segments in spaces.items():
            blocks = [join([acts[p] for p in probes]) if all(p in acts for p in probes) else None
                      for probes in block_probes(segments)]
            present = [x for x in blocks if x is not None]
            if not present:
                continue
            mom = moments.setdefault(space, Moments.zeros(present[0].shape[1], present[0].device, sums))
            for b, block in enumerate(blocks):
                if block is not None:
                    mom.add(block)
                    if (space, b) in self.derived:  # only its moments were needed
                        blocks[b] = None
            feats[space] = blocks
        source_acts = {name: acts[name] for name in self.sources if name in acts}
        for name, x in source_acts.items():
            moments.setdefault(name, Moments.zeros(x.shape[1], x.device)).add(x)
        return feats, source_acts


def batch_mask(batch: Batch, graph: FlowGraph, settings: StatisticsSettings, generator: torch.Generator):
    """``mask(tokens, device)``: the flat rows of ``batch`` kept as samples, drawn once per token
    count (every model of the batch shares the draw)."""
    return lru_cache(maxsize=None)(
        lambda tokens, device: kept_rows(token_mask(batch, tokens, graph.tokens, settings, generator), device)
    )


def collect_statistics(
    models: Sequence[nn.Module],
    reference: nn.Module,
    graph: FlowGraph,
    plan: Plan,
    batches: Iterable[Batch],
    model_inputs: Callable[[Batch], Batch],
    settings: StatisticsSettings,
    total: int | None = None,
) -> Statistics:
    """Stream the calibration batches once through the reference and every model.

    The reference's samples of a batch are kept; each model's are multiplied with them as its
    probes fire and dropped at once (while still in cache), so a model's samples are never all
    held: memory is the reference's batch plus a block.
    """
    _steady_allocator()
    spaces = plan.segments
    probing = Probing.of(graph, plan)
    recorders = [Recorder(m, probing.probes, probing.names) for m in models]
    ref_recorder = Recorder(reference, probing.probes, probing.names)
    generator = torch.Generator().manual_seed(settings.seed)
    ref_moments: dict[str, Moments] = {}  # per space, and per source (sums kept: derived products need them)
    sums = settings.center or settings.standardize
    parents = [_ParentStatistics(spaces, ref_moments, plan.magnitude_probes(), sums, probing.source_of) for _ in models]
    was_training = [m.training for m in (reference, *models)]
    for m in (reference, *models):
        m.eval()
    with torch.no_grad(), ExitStack() as stack:
        for rec in (ref_recorder, *recorders):
            stack.enter_context(rec.attached())
        for batch in track(batches, "activation statistics", total=total):
            inputs = model_inputs(batch)
            mask = batch_mask(batch, graph, settings, generator)
            ref_feats, ref_source_acts = probing.reference(ref_recorder.run(inputs, mask), spaces, ref_moments, sums)
            for rec, parent in zip(recorders, parents):
                parent.start_batch(ref_feats, ref_source_acts)
                rec.run(inputs, mask, sink=parent.add)
                parent.finish_batch()
        ref_state = _virtual_state(reference, graph)
        for model, parent in zip(models, parents):
            parent.derive(_virtual_state(model, graph), ref_state, graph.probes)
    for m, mode in zip((reference, *models), was_training):
        m.train(mode)
    pairs = [p.pairs for p in parents]
    _check_finite(pairs, ref_moments, graph)
    return Statistics(pairs, [p.magnitude() for p in parents])


def _virtual_state(model: nn.Module, graph: FlowGraph) -> dict[str, torch.Tensor]:
    return graph.to_virtual({name: p.detach() for name, p in model.named_parameters()})


class _ParentStatistics:
    """One model's sums against the reference, fed probe by probe during its forward pass.

    A sample block (``block_probes``) is accumulated as soon as every probe it joins has fired; a
    derived block (``source_of``) only adds to the moments, and its source's cross-product is
    summed instead.
    """

    def __init__(
        self,
        spaces: dict[str, Segments],
        ref_moments: dict[str, Moments],
        magnitude_probes: list[str],
        sums: bool,
        source_of: dict[tuple[str, int], str],
    ):
        self.ref_moments, self.sums, self.source_of = ref_moments, sums, source_of
        self.blocks_of: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {}
        self.probes_of: dict[tuple[str, int], tuple[str, ...]] = {}
        for space, segments in spaces.items():
            for b, probes in enumerate(block_probes(segments)):
                self.probes_of[space, b] = probes
                for probe in dict.fromkeys(probes):
                    self.blocks_of.setdefault(probe, []).append((space, b, probes))
        self.sources = set(source_of.values())
        self.magnitude_probes = set(magnitude_probes)
        self.pairs: dict[str, PairStats] = {}
        self.source_pairs: dict[str, PairStats] = {}  # a source against the reference's (sums kept)
        self.abs_moments: dict[str, Moments] = {}  # moments of |x| of the magnitude probes
        self.reference: dict[str, list[torch.Tensor | None]] = {}
        self.ref_sources: dict[str, torch.Tensor] = {}
        self.waiting: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def start_batch(self, reference: dict[str, list[torch.Tensor | None]], sources: dict[str, torch.Tensor]) -> None:
        """The reference's sample blocks and source samples of the batch this model is about to see."""
        self.reference, self.ref_sources = reference, sources

    def add(self, name: str, x: torch.Tensor) -> None:
        if name in self.sources:
            self._moments(self.source_pairs, name, x, True).cross.addmm_(x.T, self.ref_sources[name])
        if name in self.magnitude_probes:
            self.abs_moments.setdefault(name, Moments.zeros(x.shape[1], x.device)).add(x.abs())
        for space, b, probes in self.blocks_of.get(name, ()):
            parts = self.waiting.setdefault((space, b), {})
            parts[name] = x
            if len(parts) < len(set(probes)):
                continue
            del self.waiting[space, b]
            self._accumulate(space, b, join([parts[p] for p in probes]))

    def _accumulate(self, space: str, b: int, a: torch.Tensor) -> None:
        entry = self._moments(self.pairs, space, a, self.sums)
        if (space, b) not in self.source_of:
            entry.cross.addmm_(a.T, self.reference[space][b])  # in place: no batch-sized product to allocate and add

    def _moments(self, store: dict[str, PairStats], key: str, x: torch.Tensor, sums: bool) -> PairStats:
        """The entry of ``key`` (created against the reference's moments of it), with ``x`` added
        to its moments; the caller adds to its float32 cross-product."""
        entry = store.get(key)
        if entry is None:
            ref = self.ref_moments[key]
            cross = torch.zeros(x.shape[1], ref.sumsq.shape[0], dtype=torch.float32, device=x.device)
            entry = store[key] = PairStats(Moments.zeros(x.shape[1], x.device, sums), ref, cross)
        entry.a.add(x)
        return entry

    def finish_batch(self) -> None:
        if self.waiting:
            space, _ = next(iter(self.waiting))
            raise TfuseError(f"the forward pass did not reach every probe of space '{space}'")
        self.reference, self.ref_sources = {}, {}

    def derive(
        self,
        state: dict[str, torch.Tensor],
        ref_state: dict[str, torch.Tensor],
        probes: dict[str, Probe],
        sources: set[str] | None = None,
    ) -> None:
        """Add the derived blocks' cross-products (of ``sources`` only, when given): with a = x W_a^T
        + c_a and b = y W_b^T + c_b, sum a b^T = W_a (sum x y^T) W_b^T + (W_a sum x) c_b^T + c_a
        (W_b sum y)^T + n c_a c_b^T."""
        for (space, b), source in self.source_of.items():
            if sources is not None and source not in sources:
                continue
            links = [probes[p].linear for p in self.probes_of[space, b]]
            w_a, c_a = _affine_of(state, links)
            w_b, c_b = _affine_of(ref_state, links)
            x = self.source_pairs[source]
            cross = w_a @ x.cross.double() @ w_b.T
            cross += torch.outer(w_a @ x.a.sum, c_b) + torch.outer(c_a, w_b @ x.b.sum)
            cross += x.a.count * torch.outer(c_a, c_b)
            self.pairs[space].cross += cross.to(self.pairs[space].cross.dtype)

    def magnitude(self) -> dict[str, torch.Tensor]:
        return {n: m.sum / max(m.count, 1) for n, m in self.abs_moments.items()}


def _affine_of(state: dict[str, torch.Tensor], links: list[Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and shifts (float64) of a block joining affine images of one source."""
    weights = [state[link.weight].double() for link in links]
    shifts = [
        state[link.bias].double() if link.bias else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        for link, w in zip(links, weights)
    ]
    return torch.cat(weights), torch.cat(shifts)


def _check_finite(pairs: list[dict[str, PairStats]], ref: dict[str, Moments], graph: FlowGraph) -> None:
    """Name the first layer, in forward order, whose activations are not finite."""
    order = {space: i for i, space in enumerate(graph.spaces())}
    bad = [(name, f"parent {i}") for i, stats in enumerate(pairs) for name, st in stats.items() if not torch.isfinite(st.a.sumsq).all()]
    bad += [(name, "the reference") for name, m in ref.items() if not torch.isfinite(m.sumsq).all()]
    if bad:
        name, who = min(bad, key=lambda item: order.get(item[0], len(order)))
        raise TfuseError(
            f"NaN or infinity in the activations of layer '{name}' of {who}: check that checkpoint's "
            "weights and the calibration data"
        )


def release_heap() -> None:
    """Give the heap's free memory back to the system (glibc; the steady allocator keeps it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _steady_allocator() -> None:
    """Keep batch-sized buffers in glibc's heap, reused batch after batch (Linux only).

    The mmap threshold is pinned at 32 MiB, the top of glibc's own dynamic range: a threshold
    that moves lets resident memory creep up with the number of batches, and a low one maps and
    page-faults every buffer afresh. The trim threshold is raised with it (pinning the first
    leaves the second at 128 KiB): otherwise the memory a batch frees at the top of the heap goes
    back to the system and the next batch faults it in again, zeroed page by page.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
