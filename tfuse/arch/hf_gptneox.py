"""Hugging Face GPT-NeoX causal LMs (``GPTNeoXForCausalLM``: Pythia, PolyPythias): pre-LN blocks
with LayerNorm, partial RoPE, a fused per-head ``query_key_value``, a GELU MLP and an untied head,
described as a flow graph.

Symmetries the graph claims:

* the residual stream: one map for every point (the global policy is exact); LayerNorm centres
  it, so no sign flips, and once the gains are folded it admits rotations that fix the all-ones
  direction (``centred``);
* ``query_key_value`` stores each head's query, key and value rows in turn (``(heads, 3,
  head_dim)``): an interleaved view (``groups=heads``) splits it into virtual Q, K and V
  parameters, and the probes of their spaces take the same slices of its output (their
  cross-products follow from those of its input, the normalised stream: ``Linear``);
* attention: RoPE rotates each head's first ``rotary_ndims`` Q/K dimensions (``head_dim x
  partial_rotary_factor``) in fixed pairs, so heads move as wholes with those dimensions in
  place; the remaining Q/K dimensions of a head move freely, jointly in Q and K; value
  dimensions permute with the output projection's (``dense``) columns;
* the GELU MLP's hidden units permute (no signs: GELU is not odd);
* the untied output head (``embed_out``, ``lm_head`` in transformers 5) reads the normalised last
  point; a tied one is the input table, which the graph already moves.

Parallel residual blocks (``use_parallel_residual``) add both branches to the block's input, each
reading its own LayerNorm of it. The graph chains the two sums, ``middle = input + attention``,
``output = middle + MLP``, as for serial blocks, and gives the MLP's LayerNorm the point
``middle``, probed at that norm's input (the block's input in a parallel block). Under the global
policy every point shares one map, so this is exact; each LayerNorm keeps a space of its own, so
its gain folds into its own branch. The combining residual policies (already approximate) then
move a parallel block's MLP inputs with the map of the partial sum ``input + attention``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tfuse.arch.base import checkpoint_config, rotary_dims, widened_hf
from tfuse.arch.tokenized import attach_tokenizer, load_causal_lm, load_tokenizer, save, special_ids, tokenizer_of
from tfuse.fusion.graph import FlowGraph, GraphBuilder, In, Linear, Out, Probe, TokenLayout

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's text functions

causal_lm = True


def build(cfg, task) -> GPTNeoXForCausalLM:
    """A fresh GPT-NeoX from the ``model`` config group for a causal-LM task's tokenizer."""
    tokenizer = task.tokenizer
    dropout = cfg.get("dropout", 0.0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        max_position_embeddings=max(cfg.get("max_position", 0) or 0, task.max_length),
        use_parallel_residual=cfg.get("parallel_residual", True),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0),
                         "partial_rotary_factor": cfg.get("rotary_pct", 0.25)},
        attention_bias=cfg.get("attention_bias", True),
        attention_dropout=dropout, hidden_dropout=dropout,
        tie_word_embeddings=cfg.get("tie_embeddings", False),
        **special_ids(tokenizer),
    )
    return attach_tokenizer(GPTNeoXForCausalLM(config), tokenizer)


def graph(model: nn.Module) -> FlowGraph:
    cfg = model.config
    names = {n for n, _ in model.named_parameters()}
    heads = cfg.num_attention_heads
    g = GraphBuilder()
    s0 = g.point(0)
    g.param("gpt_neox.embed_in.weight", None, Out(s0))
    g.probe(s0, "gpt_neox.embed_in")
    for layer in range(cfg.num_hidden_layers):
        block, name = f"gpt_neox.layers.{layer}", f"layers.{layer}"
        g.graph.blocks.append(block)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        g.norm(f"{block}.input_layernorm", before)
        attn = f"{block}.attention"
        fused = f"{attn}.query_key_value"
        bias = f"{fused}.bias" in names
        spaces = g.attention(f"{name}.attn", heads, rope=True, rotary=rotary_dims(cfg, cfg.hidden_size // heads))
        source = Probe(fused, "input")  # the normalised stream the three read
        for i, (space, part) in enumerate(zip(spaces, "qkv")):
            g.linear(f"{attn}.{part}", space, before, bias=bias)
            g.probe(space, fused, part=(i, 3), groups=heads,
                    linear=Linear(source, f"{attn}.{part}.weight", f"{attn}.{part}.bias" if bias else None))
        g.fused(f"{fused}.weight", 0, *(f"{attn}.{p}.weight" for p in "qkv"), groups=heads)
        if bias:
            g.fused(f"{fused}.bias", 0, *(f"{attn}.{p}.bias" for p in "qkv"), groups=heads)
        attn_out = f"{name}.attn_out"
        g.linear(f"{attn}.dense", attn_out, spaces[2], bias=f"{attn}.dense.bias" in names)
        g.probe(attn_out, f"{attn}.dense")
        g.residual(middle, before, attn_out)
        g.probe(middle, f"{block}.post_attention_layernorm", "input")
        g.norm(f"{block}.post_attention_layernorm", middle)
        mlp = f"{block}.mlp"
        mlp_out = g.mlp_block(name, middle, f"{mlp}.dense_h_to_4h", f"{mlp}.act", f"{mlp}.dense_4h_to_h")
        g.residual(after, middle, mlp_out)
        g.probe(after, block)
    last = g.point(2 * cfg.num_hidden_layers)
    g.norm("gpt_neox.final_layer_norm", last)
    if "lm_head.weight" in names:  # untied: the head reads the normalised last point
        g.param("lm_head.weight", None, In(last))
    g.graph.rotations = "centred"  # pre-LN: every LayerNorm has a point of its own and feeds only its branch
    g.graph.tokens = TokenLayout(cls=None, grid=None, prefix=0)
    return g.graph


def widened(model: nn.Module, units: int) -> nn.Module:
    return widened_hf(model, "intermediate_size", units)


def tiny() -> GPTNeoXForCausalLM:
    """A small random model of the family (``tfuse check-family``): 4 heads of 8 dimensions, half
    of them under RoPE, parallel residual, untied head."""
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.5, bos_token_id=0, eos_token_id=0))


def owns(model) -> bool:
    return isinstance(model, GPTNeoXForCausalLM)


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a GPT-NeoX."""
    return checkpoint_config(path, label, "hf_gptneox")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> GPTNeoXForCausalLM:
    return load_causal_lm(path, revision, dtype, "hf_gptneox", GPTNeoXForCausalLM)
