"""The transport map flow graph: where each weight of an architecture reads and writes.

An architecture describes itself as plain data (``FlowGraph``); the engine never names a layer.

* A *space* is a hidden dimension that rows or columns of weights live in (the residual stream
  at one point, the queries of one layer, the hidden units of one MLP). Each gets a transport
  map per parent.
* ``params`` says, for every parameter, which space each axis belongs to and on which side:
  ``Out`` (the axis is written: rows, biases, LayerNorm gains, embedding columns) or ``In``
  (the axis is read: the columns of a consumer). Axes that are never aligned (classes, pixels,
  positions) are ``None``.
* ``probes`` says where each space's activations can be observed (a module's output or input,
  shaped ``(batch, tokens, width)``). A probe may also say that its activations are an affine
  image of another tensor (``Linear``: the queries, keys and values of the normalised stream):
  then its cross-products with the reference follow from that source's, one product for all
  the probes that share it.
* ``residuals`` says how stream points are formed: ``out = skip + branch``. The residual policy
  of the fusion settings decides how their maps combine.
* ``attention`` lists the multi-head attention blocks so that Q/K modes and head-aware maps can
  tie the query, key and value spaces together.
* ``blocks`` lists the module paths of the repeated blocks in the order they run, each called
  with the previous one's output tensor as its first argument and returning a tensor: the repair
  replays a model from any block with that block's input cached.
* ``signed`` lists the spaces whose symmetry includes sign flips: a neuron negated everywhere it
  is written and read leaves the function unchanged (no LayerNorm centres it, no nonlinearity
  reads it alone). Axes that keep their sign under a flip say ``Out(space, magnitude=True)``.
* ``norms`` says which normalisation writes each space it normalises (its gain, shift, and
  whether it centres), and ``rotations`` whether the stream admits rotations once every norm is
  folded into the layers reading it (``fold.py``): ``rms`` any rotation (RMSNorm), ``centred``
  those that fix the all-ones direction (LayerNorm), None none (a post-LN stream, whose norms
  sit on the stream itself).
* ``transposed`` names the linear modules that store their weight as (in, out) (GPT-2's
  ``Conv1D``), for the repair.
* ``views`` says how a parameter stored fused (timm's ``qkv``: rows ``[q; k; v]``) splits into
  *virtual* parameters along one axis: equal ones, or in given proportions (Phi-3's ``qkv_proj``
  under grouped-query attention: ``heads : kv_heads : kv_heads``), or interleaved per group
  (GPT-NeoX's ``query_key_value``: each head's ``[q; k; v]`` rows in turn). ``params`` describes the
  virtual ones, and the engine works on the virtual parameter dict (``to_virtual`` /
  ``to_real``). A probe may likewise observe one such part of a module output's last dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tfuse.errors import TfuseError


@dataclass(frozen=True)
class Out:
    """The axis is written into ``space`` (output side: barycentric projection). ``magnitude``:
    the axis keeps its sign when a signed map flips the neuron (an RMSNorm gain, a SwiGLU gate
    row), so it is moved by the map's absolute value."""

    space: str
    magnitude: bool = False


@dataclass(frozen=True)
class In:
    """The axis reads ``space`` (input side: the consumer keeps the signal's total)."""

    space: str


Axis = Out | In | None
Part = tuple[int, int | tuple[int, ...]]


@dataclass(frozen=True)
class Probe:
    """Activations of a space: the output (or input) of the module at ``module``."""

    module: str
    where: str = "output"  # "output" | "input"
    part: Part | None = None  # the i-th slice of the last dimension: (i, n) of n equal ones, (i, shares) in proportions
    linear: Linear | None = None  # the activations are an affine image of another probe's
    groups: int = 1  # the ``part`` is taken in each of this many consecutive chunks (``Split.groups``)

    def select(self, x):
        """The observed slice of a module's input or output (all of it without ``part``)."""
        if self.part is None:
            return x
        i, n = self.part
        grouped = x.unflatten(-1, (self.groups, -1)) if self.groups > 1 else x
        sizes = part_sizes(grouped.shape[-1], (1,) * n if isinstance(n, int) else n)
        start = sum(sizes[:i])
        part = grouped[..., start:start + sizes[i]]
        return part.flatten(-2) if self.groups > 1 else part


def part_sizes(total: int, shares: tuple[int, ...]) -> list[int]:
    """The sizes of ``total`` split in the proportions ``shares``."""
    return [total * share // sum(shares) for share in shares]


@dataclass(frozen=True)
class Linear:
    """Activations equal to ``source @ weight.T + bias`` (virtual parameter names)."""

    source: Probe
    weight: str
    bias: str | None = None


@dataclass(frozen=True)
class Split:
    """A real parameter stored fused: ``parts`` are virtual parameters along ``axis``, equal or in
    the proportions ``shares`` (one per part). With ``groups`` above one the axis holds ``groups``
    consecutive chunks, each made of one slice of every part in turn (per-head interleaving)."""

    axis: int
    parts: tuple[str, ...]
    shares: tuple[int, ...] | None = None
    groups: int = 1

    def split(self, w: torch.Tensor, name: str) -> list[torch.Tensor]:
        """The virtual parts of the real parameter ``w`` (views of it when ``groups`` is one)."""
        shares = self.shares or (1,) * len(self.parts)
        if w.shape[self.axis] % (self.groups * sum(shares)):
            raise TfuseError(f"parameter '{name}' axis {self.axis} (size {w.shape[self.axis]}) does not split into "
                             f"{self.groups} group(s) of parts in the proportions {':'.join(map(str, shares))}")
        if self.groups == 1:
            return list(w.split(part_sizes(w.shape[self.axis], shares), dim=self.axis))
        grouped = w.unflatten(self.axis, (self.groups, -1))
        parts = grouped.split(part_sizes(grouped.shape[self.axis + 1], shares), dim=self.axis + 1)
        return [part.flatten(self.axis, self.axis + 1) for part in parts]

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The real parameter from its virtual ``parts`` (``split``'s inverse)."""
        if self.groups == 1:
            return torch.cat(parts, dim=self.axis)
        grouped = torch.cat([part.unflatten(self.axis, (self.groups, -1)) for part in parts], dim=self.axis + 1)
        return grouped.flatten(self.axis, self.axis + 1)


@dataclass(frozen=True)
class Residual:
    """Stream point ``out`` holds ``skip + branch``."""

    out: str
    skip: str
    branch: str


@dataclass(frozen=True)
class Attention:
    """One multi-head attention block: its query, key and value spaces and head count.

    Grouped-query attention (``kv_heads`` below ``heads``): each key/value head serves
    ``heads / kv_heads`` consecutive query heads, and the output projection reads ``o``, the
    value heads as each query head sees them (``heads x`` the value head width). ``rope``: the
    query/key dimensions inside a head are rotated in fixed pairs, so only whole heads move;
    ``rotary`` (partial RoPE): only each head's first ``rotary`` Q/K dimensions are, the others
    move freely inside their head, jointly in Q and K."""

    name: str
    q: str
    k: str
    v: str
    heads: int
    kv_heads: int | None = None  # None: one per query head
    rope: bool = False
    o: str | None = None  # the space the output projection reads; None: ``v``
    rotary: int | None = None  # under ``rope``: the Q/K dimensions pinned at each head's start (None: all)

    def pinned(self, head_dim: int) -> int:
        """The Q/K dimensions at the start of each head that never move (all under full RoPE)."""
        return pinned_dims(self.rope, self.rotary, head_dim)

    @property
    def grouped(self) -> bool:
        """Whether the block needs the grouped head rule (GQA, or RoPE's fixed dimensions)."""
        return self.rope or (self.kv_heads or self.heads) != self.heads


def pinned_dims(rope: bool, rotary: int | None, head_dim: int) -> int:
    """The leading Q/K dimensions of a head that RoPE rotates in fixed pairs: all of them, the
    first ``rotary`` under partial RoPE, none without RoPE."""
    return (head_dim if rotary is None else min(rotary, head_dim)) if rope else 0


@dataclass(frozen=True)
class Norm:
    """A normalisation's gain and shift (None: RMSNorm's none), and whether it centres."""

    gain: str
    bias: str | None
    centred: bool


@dataclass(frozen=True)
class TokenLayout:
    """Where the special tokens sit, for the token filters (``cls``, ``window``)."""

    cls: int | None = 0
    grid: tuple[int, int] | None = None  # patch grid (rows, cols) after ``prefix`` tokens
    prefix: int = 1  # tokens before the first patch (class token, registers)


@dataclass
class FlowGraph:
    """A model family's description, instantiated for one model."""

    params: dict[str, tuple[Axis, ...]]
    probes: dict[str, Probe]
    residuals: list[Residual] = field(default_factory=list)
    attention: list[Attention] = field(default_factory=list)
    tokens: TokenLayout = field(default_factory=TokenLayout)
    stream: str = "stream"  # prefix naming the stream points (``stream.0`` is the embeddings')
    views: dict[str, Split] = field(default_factory=dict)  # real parameter -> its virtual parts
    blocks: list[str] = field(default_factory=list)  # module paths of the repeated blocks, in order
    signed: set[str] = field(default_factory=set)  # spaces whose neurons may also flip sign (RMSNorm streams)
    transposed: set[str] = field(default_factory=set)  # linear modules that store weights (in, out): x @ W + b
    norms: dict[str, Norm | None] = field(default_factory=dict)  # space -> the normalisation writing it (None: two)
    rotations: str | None = None  # "rms" | "centred": the stream rotates once the norms are folded

    def to_virtual(self, state: dict) -> dict:
        """Real parameter dict -> the virtual one ``params`` describes (fused ones split)."""
        out = {}
        for name, w in state.items():
            view = self.views.get(name)
            if view is None:
                out[name] = w
                continue
            out.update(zip(view.parts, view.split(w, name)))
        return out

    def to_real(self, state: dict) -> dict:
        """Virtual parameter dict -> the model's own (virtual parts concatenated back)."""
        out = dict(state)
        for name, view in self.views.items():
            if all(part in out for part in view.parts):
                out[name] = view.join([out.pop(part) for part in view.parts])
        return out

    def real_names(self) -> set[str]:
        """The model's own parameter names that ``params`` describes (fused parameters whole)."""
        part_of = {part: name for name, view in self.views.items() for part in view.parts}
        return {part_of.get(name, name) for name in self.params}

    def spaces(self) -> list[str]:
        """Every space, in the order the forward pass first touches it."""
        seen: dict[str, None] = {}
        for axes in self.params.values():
            for ax in axes:
                if ax is not None:
                    seen.setdefault(ax.space)
        return list(seen)

    def stream_points(self) -> list[str]:
        return [s for s in self.spaces() if self.is_stream(s)]

    def is_stream(self, space: str) -> bool:
        return space == self.stream or space.startswith(self.stream + ".")


class GraphBuilder:
    """Small helpers that keep architecture descriptions short and declarative."""

    def __init__(self, stream: str = "stream"):
        self.graph = FlowGraph(params={}, probes={}, stream=stream)

    def point(self, index: int) -> str:
        """Name of the stream's ``index``-th residual point."""
        return f"{self.graph.stream}.{index}"

    def param(self, name: str, *axes: Axis) -> None:
        self.graph.params[name] = axes

    def linear(self, prefix: str, out: str | None, inp: str | None, bias: bool = True) -> None:
        """``prefix.weight`` (out, in) and ``prefix.bias`` (out)."""
        self.param(f"{prefix}.weight", Out(out) if out else None, In(inp) if inp else None)
        if bias:
            self.param(f"{prefix}.bias", Out(out) if out else None)

    def norm(self, prefix: str, space: str, bias: bool = True, centred: bool | None = None) -> None:
        """A LayerNorm's gain and shift live in the space it normalises (an RMSNorm's gain, without
        a shift, keeps its sign under a signed map). ``centred`` (default: ``bias``): a LayerNorm."""
        self.param(f"{prefix}.weight", Out(space, magnitude=not bias))
        if bias:
            self.param(f"{prefix}.bias", Out(space))
        norm = Norm(f"{prefix}.weight", f"{prefix}.bias" if bias else None, bias if centred is None else centred)
        self.graph.norms[space] = None if space in self.graph.norms else norm  # two norms on one space: ambiguous

    def probe(
        self, space: str, module: str, where: str = "output", part: Part | None = None,
        linear: Linear | None = None, groups: int = 1,
    ) -> None:
        self.graph.probes[space] = Probe(module, where, part, linear, groups)

    def fused(self, name: str, axis: int, *parts: str, shares: tuple[int, ...] | None = None, groups: int = 1) -> None:
        """Real parameter ``name`` holds the virtual ``parts`` concatenated along ``axis`` (equal,
        or in the proportions ``shares``; with ``groups``, interleaved: one slice of each part per
        group)."""
        self.graph.views[name] = Split(axis, parts, shares, groups)

    def residual(self, out: str, skip: str, branch: str) -> None:
        self.graph.residuals.append(Residual(out, skip, branch))

    def attention_block(self, name: str, heads: int, reads: str, modules: tuple[str, str, str, str]) -> str:
        """Q, K, V projections (module paths ``modules[:3]``) reading ``reads`` and the output
        projection ``modules[3]`` writing a new branch space, all probed; returns that space.
        The three projections read one tensor (the query projection's input)."""
        q, k, v = self.attention(f"{name}.attn", heads)
        source = Probe(modules[0], "input")
        for space, module in zip((q, k, v), modules[:3]):
            self.linear(module, space, reads)
            self.probe(space, module, linear=Linear(source, f"{module}.weight", f"{module}.bias"))
        out = f"{name}.attn_out"
        self.linear(modules[3], out, v)
        self.probe(out, modules[3])
        return out

    def mlp_block(
        self, name: str, reads: str, fc1: str, act: str, fc2: str, probe: str | None = None,
        bias: tuple[bool, bool] = (True, True),
    ) -> str:
        """``fc1`` reading ``reads`` into a hidden space probed at the activation module ``act``,
        then ``fc2`` writing a new branch space probed at ``probe`` (default: ``fc2`` itself);
        ``bias`` says which of the two Linears have one. Returns the branch space."""
        hidden, out = f"{name}.mlp", f"{name}.mlp_out"
        self.linear(fc1, hidden, reads, bias=bias[0])
        self.probe(hidden, act)
        self.linear(fc2, out, hidden, bias=bias[1])
        self.probe(out, probe or fc2)
        return out

    def attention(self, name: str, heads: int, kv_heads: int | None = None, rope: bool = False,
                  rotary: int | None = None) -> tuple[str, str, str]:
        """Register an attention block; returns its query, key and value space names (with
        grouped key/value heads, the output projection reads ``{name}.o``; ``rotary``: partial RoPE)."""
        q, k, v = f"{name}.q", f"{name}.k", f"{name}.v"
        o = f"{name}.o" if (kv_heads or heads) != heads else None
        self.graph.attention.append(Attention(name, q, k, v, heads, kv_heads, rope, o, rotary))
        return q, k, v
