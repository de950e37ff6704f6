"""Hugging Face ``GPT2LMHeadModel``: pre-LN blocks whose ``Conv1D`` layers store weights as
(in, out) and fuse Q, K and V in one ``c_attn``, described as a flow graph.

``c_attn``'s weight splits along its output axis into three virtual (in, out) parameters, its
bias likewise; learned position embeddings write the first stream point beside the token
table, which the LM head reads back (tied). LayerNorm centres the stream, so no sign flips.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tfuse.arch.base import checkpoint_config, widened_hf
from tfuse.arch.tokenized import attach_tokenizer, load_causal_lm, load_tokenizer, save, special_ids, tokenizer_of
from tfuse.fusion.graph import FlowGraph, GraphBuilder, In, Out, TokenLayout

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's text functions

causal_lm = True


def build(cfg, task) -> GPT2LMHeadModel:
    """A fresh GPT-2 from the ``model`` config group for a causal-LM task's tokenizer."""
    tokenizer = task.tokenizer
    dropout = cfg.get("dropout", 0.0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(cfg.get("max_position", 0) or 0, task.max_length),
        n_embd=cfg.hidden_size,
        n_layer=cfg.depth,
        n_head=cfg.heads,
        n_inner=cfg.mlp_size,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        **special_ids(tokenizer),
    )
    return attach_tokenizer(GPT2LMHeadModel(config), tokenizer)


def _conv(g: GraphBuilder, prefix: str, out: str, inp: str) -> None:
    """A ``Conv1D``: weight (in, out), bias (out)."""
    g.param(f"{prefix}.weight", In(inp), Out(out))
    g.param(f"{prefix}.bias", Out(out))
    g.graph.transposed.add(prefix)


def graph(model: GPT2LMHeadModel) -> FlowGraph:
    cfg = model.config
    g = GraphBuilder()
    s0 = g.point(0)
    g.param("transformer.wte.weight", None, Out(s0))
    g.param("transformer.wpe.weight", None, Out(s0))
    g.probe(s0, "transformer.drop")
    for layer in range(cfg.n_layer):
        block, name = f"transformer.h.{layer}", f"layers.{layer}"
        g.graph.blocks.append(block)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        g.norm(f"{block}.ln_1", before)
        attn = f"{block}.attn"
        q, k, v = g.attention(f"{name}.attn", cfg.n_head)
        for i, (space, part) in enumerate(((q, "q"), (k, "k"), (v, "v"))):
            g.param(f"{attn}.{part}.weight", In(before), Out(space))
            g.param(f"{attn}.{part}.bias", Out(space))
            g.probe(space, f"{attn}.c_attn", part=(i, 3))
        g.fused(f"{attn}.c_attn.weight", 1, *(f"{attn}.{p}.weight" for p in "qkv"))
        g.fused(f"{attn}.c_attn.bias", 0, *(f"{attn}.{p}.bias" for p in "qkv"))
        g.graph.transposed.add(f"{attn}.c_attn")
        attn_out = f"{name}.attn_out"
        _conv(g, f"{attn}.c_proj", attn_out, v)
        g.probe(attn_out, f"{attn}.c_proj")
        g.residual(middle, before, attn_out)
        g.probe(middle, f"{block}.ln_2", "input")
        g.norm(f"{block}.ln_2", middle)
        hidden, mlp_out = f"{name}.mlp", f"{name}.mlp_out"
        _conv(g, f"{block}.mlp.c_fc", hidden, middle)
        g.probe(hidden, f"{block}.mlp.act")
        _conv(g, f"{block}.mlp.c_proj", mlp_out, hidden)
        g.probe(mlp_out, f"{block}.mlp.c_proj")
        g.residual(after, middle, mlp_out)
        g.probe(after, block)
    last = g.point(2 * cfg.n_layer)
    g.norm("transformer.ln_f", last)
    if "lm_head.weight" in {n for n, _ in model.named_parameters()}:  # untied
        g.param("lm_head.weight", None, In(last))
    g.graph.rotations = "centred"  # pre-LN: every LayerNorm reads the stream and feeds only its branch
    g.graph.tokens = TokenLayout(cls=None, grid=None, prefix=0)
    return g.graph


def widened(model: nn.Module, units: int) -> nn.Module:
    return widened_hf(model, "n_inner", units)


def tiny() -> GPT2LMHeadModel:
    """A small random model of the family (``tfuse check-family``)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                      eos_token_id=0))


def owns(model) -> bool:
    return isinstance(model, GPT2LMHeadModel)


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a GPT-2."""
    return checkpoint_config(path, label, "hf_gpt2")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> GPT2LMHeadModel:
    return load_causal_lm(path, revision, dtype, "hf_gpt2", GPT2LMHeadModel)
