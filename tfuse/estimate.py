"""What fusing two (or more) LLaMA-shaped checkpoints needs, from their shapes alone: the memory
of the streamed statistics (per space and in all), of the weights, and of the repair, and the
time of the transport solves given a measured solver speed.

The counts follow the code: OT with the decoder settings (activation cost, global stream,
grouped head rule, ``tokens=all``) keeps, per moved parent, a float32 cross-product
(``n_parent x n_reference``) and float64 moments per resolved space (the stream, and per layer
Q, K, V and the SwiGLU hidden space), and per layer one float32 cross-product of the attention's
input (Q, K and V are affine images of it: ``statistics.py``). The lstsq repair holds, for its
largest stage, ``X^T X`` and ``X^T Y`` in float64, plus every replayed model's cached block
input for the repair samples."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfuse.errors import TfuseError
from tfuse.fusion.held import HELD_BYTES

GB = 1e9


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    tied: bool
    positions: int = 0  # learned position embeddings (GPT-2); RoPE models have none

    @classmethod
    def from_config(cls, config: dict) -> "DecoderShape":
        """From a LLaMA-family or GPT-2 ``config.json``'s fields."""
        if config.get("model_type") == "gpt2":
            d = config.get("n_embd", 768)
            return cls(d, config.get("n_layer", 12), config.get("n_head", 12), config.get("n_head", 12),
                       d // config.get("n_head", 12), config.get("n_inner") or 4 * d, config.get("vocab_size", 50257),
                       bool(config.get("tie_word_embeddings", True)), config.get("n_positions", 1024))
        try:
            heads = config["num_attention_heads"]
            return cls(config["hidden_size"], config["num_hidden_layers"], heads,
                       config.get("num_key_value_heads") or heads,
                       config.get("head_dim") or config["hidden_size"] // heads, config["intermediate_size"],
                       config["vocab_size"], bool(config.get("tie_word_embeddings", False)))
        except KeyError as err:
            raise TfuseError(f"the config has no {err.args[0]!r}: give a LLaMA-family config.json") from err

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.outer_parameters()

    def layer_parameters(self) -> int:
        """One block's (SwiGLU: three MLP matrices; GPT-2: two, with biases and LayerNorm shifts)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.positions:
            return 4 * d * d + 4 * d + 2 * d * self.mlp + self.mlp + d + 4 * d
        return d * q * 2 + d * kv * 2 + 3 * d * self.mlp + 2 * d

    def outer_parameters(self) -> int:
        """The parameters outside the blocks: embeddings, head, final norm."""
        norm = 2 if self.positions else 1  # GPT-2's LayerNorm has a shift, RMSNorm none
        return (self.vocab * (1 if self.tied else 2) + self.positions + norm) * self.hidden

    def spaces(self) -> dict[str, int]:
        """Width of every resolved space with its own statistics (per layer: ``layer.*``)."""
        return {"stream": self.hidden, "layer.q": self.heads * self.head_dim, "layer.k": self.kv_heads * self.head_dim,
                "layer.v": self.kv_heads * self.head_dim, "layer.mlp": self.mlp, "layer.attention_input": self.hidden}


# Published shapes: Llama-3.2-1B (GQA 32/8, tied), Llama-2-7B (multi-head, untied), Llama-3-8B
# (GQA 32/8, untied), and the benchmark's scale cases (scripts/scale_cases.py).
PRESETS = {
    "llama-1b": DecoderShape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256, tied=True),
    "llama-7b": DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, mlp=11008, vocab=32000, tied=False),
    "llama3-8b": DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256, tied=False),
    "gpt2-124m": DecoderShape(hidden=768, layers=12, heads=12, kv_heads=12, head_dim=64, mlp=3072, vocab=50257, tied=True,
                              positions=1024),
    "qwen2-0.5b": DecoderShape(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, mlp=4864, vocab=151936, tied=True),
    "tinyllama-1.1b": DecoderShape(hidden=2048, layers=22, heads=32, kv_heads=4, head_dim=64, mlp=5632, vocab=32000,
                                   tied=False),
}
PROCESS_BYTES = 1.1e9  # a CPU process with torch, transformers and tfuse imported (measured; not on a GPU's count)


def shape_of(name: str) -> DecoderShape:
    """A preset's name, or the path of a ``config.json`` (or of the directory holding one)."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise TfuseError(f"--estimate {name}: neither a preset ({', '.join(PRESETS)}) nor a config.json")
    return DecoderShape.from_config(json.loads(path.read_text(encoding="utf-8")))


def statistics_bytes(shape: DecoderShape, parents: int = 2, sums: bool = False) -> dict[str, float]:
    """Bytes of the statistics per space (summed over layers) and in all (``total``): per moved
    parent a float32 cross-product and its float64 moments, and the reference's moments once.
    ``sums``: the cost centres or standardises (plain sums kept too)."""
    moved, per = parents - 1, {}
    moment = 8 * (2 if sums else 1)
    for name, n in shape.spaces().items():
        count = shape.layers if name.startswith("layer.") else 1
        if name == "layer.attention_input":  # a source: both sums always kept
            per[name] = count * (moved * (4 * n * n + 16 * n) + 16 * n)
        else:
            per[name] = count * (moved * (4 * n * n + moment * n) + moment * n)
    per["total"] = sum(per.values())
    return per


def weights_bytes(shape: DecoderShape, parents: int = 2, bytes_per: int = 4) -> dict[str, float]:
    """The models held at once: the parents, the moved parents' aligned weights and the fused
    model while fusing; the repair adds every aligned parent as a model (its targets)."""
    one = shape.parameters() * bytes_per
    fuse = (parents + (parents - 1) + 1) * one
    return {"one_model": one, "fuse": fuse, "repair": fuse + parents * one}


def repair_bytes(shape: DecoderShape, parents: int, samples: int, tokens: int) -> dict[str, float]:
    """The lstsq repair's memory: its largest normal equations (float64), the fused model's cached
    block inputs (float32, always in memory) and the budget its other held state may fill
    (``fusion/held.py``); beyond the budget, the aligned parents' block inputs and one block's
    targets spill to disk (``spill``)."""
    d, q, kv, mlp = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.mlp
    stages = {  # (inputs, total outputs) per stage
        "qkv": (d, q + 2 * kv), "o_proj": (q, d), "gate_up": (d, 2 * mlp), "down_proj": (mlp, d),
    }
    if not shape.tied:
        stages["lm_head"] = (d, shape.vocab)
    largest = max(8 * ((n + 1) ** 2 + (n + 1) * m) for n, m in stages.values())
    rows = samples * tokens * 4
    fused = rows * d
    block_targets = rows * sum(m for name, (_, m) in stages.items() if name != "lm_head")
    spill = max(parents * rows * d + block_targets - HELD_BYTES, 0)
    return {"normal_equations": largest, "block_inputs": fused, "held": HELD_BYTES,
            "total": largest + fused + HELD_BYTES, "spill": spill}


def solve_seconds(shape: DecoderShape, seconds: Callable[[int], float], parents: int = 2) -> dict[str, float]:
    """Transport solves per moved parent given ``seconds(n)`` for one n x n problem: the stream,
    per layer the SwiGLU space and the grouped heads' blocks (kv_heads^2 value blocks of head_dim
    and as many query-head problems), summed over the moved parents."""
    moved = parents - 1
    r = shape.heads // shape.kv_heads
    heads = shape.kv_heads ** 2 * (seconds(shape.head_dim) + (seconds(r) if r > 1 else 0.0)) + seconds(shape.kv_heads)
    per = {"stream": seconds(shape.hidden), "layer.mlp": shape.layers * seconds(shape.mlp), "layer.heads": shape.layers * heads}
    per = {k: moved * v for k, v in per.items()}
    per["total"] = sum(per.values())
    return per


def stream_bytes(shape: DecoderShape, parents: int = 2, samples: int = 32, tokens: int = 128, batch: int = 8,
                 bytes_per: int = 4, repair: bool = False, budget: float | None = None, process: bool = True) -> dict[str, float]:
    """The peak memory of ``fusion.stream`` (``stream.py``), from its phases: pass 1 holds each
    parent's outer parameters (before the blocks), then one block of each with that block's
    statistics and a transport solve; pass 2 builds the fused model, holding one part of each
    parent, and with the repair one stage's cross-Grams (float64: ``X^T X``, ``X^T X_k``, ``X_k^T X_l``)
    and one batch's activations. The hidden states at the block boundary (every parent's, and the
    fused model's in the repair) are held up to ``budget`` bytes (None: all), the rest on disk.
    ``process``: a CPU process's imports counted (``PROCESS_BYTES``)."""
    d, mlp, n = shape.hidden, shape.mlp, parents
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    held = lambda models: min(models * samples * tokens * d * bytes_per, budget if budget is not None else float("inf"))  # noqa: E731
    rope = 0 if shape.positions else 2 * samples * tokens * shape.head_dim * bytes_per * n  # cos/sin each block is given
    outer, block = shape.outer_parameters() * bytes_per, shape.layer_parameters() * bytes_per
    stats = (n - 1) * 4 * (q * q + 2 * kv * kv + mlp * mlp + 2 * d * d) + 4 * d * d  # a block's, and the stream's
    transport = 3 * 8 * max(mlp, d) ** 2  # the largest space's cost, normalised copy and plan (float64)
    grams = 8 * mlp * mlp * (1 + n + n * (n + 1) // 2) if repair else 0
    head = 8 * d * d * (1 + n + n * (n + 1) // 2) + 16 * d * 8192 if repair and not shape.tied else 0
    activations = batch * tokens * (3 * mlp + 4 * d) * 4
    fused = shape.parameters() * bytes_per
    pass_one = max(n * outer, n * block + stats + transport + activations) + held(n) + rope
    pass_two = max(fused + (n + 1) * block + activations + grams + held(n + 1 if repair else 0),
                   fused + (n * outer if repair else outer) + head)
    out = {"fused_weights": fused, "one_block_per_parent": n * block, "outer_per_parent": outer,
           "hidden_states_held": held(n + 1 if repair else n), "statistics_block": stats, "transport": transport,
           "repair_grams": max(grams, head), "activations": activations, "process": PROCESS_BYTES if process else 0,
           "pass_one": pass_one, "pass_two": pass_two}
    out["total"] = out["process"] + max(pass_one, pass_two)
    out["spill"] = max((n + (1 if repair else 0)) * samples * tokens * d * bytes_per - held(n + 1 if repair else n), 0)
    return out
