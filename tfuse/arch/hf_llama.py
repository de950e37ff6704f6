"""Hugging Face LLaMA-family causal LMs (``LlamaForCausalLM``; ``MistralForCausalLM``,
``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` share its module layout): pre-norm blocks with
RMSNorm, RoPE, SwiGLU and grouped-query attention, described as a flow graph.

Symmetries the graph claims:

* the residual stream: one map for every point (the global policy is exact), and because
  RMSNorm does not centre, a *signed* one: a coordinate negated wherever it is written and read
  leaves the model's function unchanged; the RMSNorm gains keep their sign (``magnitude``);
* SwiGLU: ``gate_proj`` and ``up_proj`` write one hidden space that ``down_proj`` reads; an
  ``up``/``down`` pair may flip sign, the ``gate`` row may not (SiLU is not odd);
* attention: RoPE rotates fixed pairs of Q/K dimensions, so only whole heads move; under GQA a
  key/value group moves with its query heads, which may reorder inside the group; value
  dimensions permute (and flip) with the output projection's columns of every query head of the
  group (``{name}.attn.o``);
* tied input and output embeddings: the table is transported once, its columns in the stream;
* Qwen3's ``q_norm`` / ``k_norm``: an RMSNorm over each head's Q/K dimensions whose gain every
  head shares; heads move as wholes and RoPE keeps those dimensions in place, so the gain never
  moves (its axis is fixed).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from tfuse.arch.base import checkpoint_config, variant, widened_hf
from tfuse.arch.tokenized import attach_tokenizer, load_causal_lm, load_tokenizer, save, special_ids, tokenizer_of
from tfuse.fusion.graph import FlowGraph, GraphBuilder, In, Linear, Out, Probe, TokenLayout

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's text functions

CLASSES = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)
VARIANTS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
causal_lm = True
widens_heads = True  # head_dim is the config's own: more heads (fusion.widen) leave the stream as it is


def build(cfg, task) -> nn.Module:
    """A fresh LLaMA or Qwen3 (``model.variant``) from the ``model`` config group for a causal-LM
    task's tokenizer."""
    config_class, model_class = variant(cfg, VARIANTS, "llama")
    tokenizer = task.tokenizer
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.get("kv_heads") or cfg.heads,
        head_dim=cfg.get("head_dim") or cfg.hidden_size // cfg.heads,
        max_position_embeddings=max(cfg.get("max_position", 0) or 0, task.max_length),
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        attention_bias=cfg.get("attention_bias", False),
        attention_dropout=cfg.get("dropout", 0.0),
        rope_theta=cfg.get("rope_theta", 10000.0),
        **special_ids(tokenizer),
    )
    return attach_tokenizer(model_class(config), tokenizer)


def graph(model: nn.Module) -> FlowGraph:
    cfg = model.config
    names = {n for n, _ in model.named_parameters()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    g = GraphBuilder()
    s0 = g.point(0)
    g.param("model.embed_tokens.weight", None, Out(s0))
    g.probe(s0, "model.embed_tokens")
    signed = set()
    for layer in range(cfg.num_hidden_layers):
        block, name = f"model.layers.{layer}", f"layers.{layer}"
        g.graph.blocks.append(block)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        sandwich = f"{block}.pre_feedforward_layernorm.weight" in names  # Gemma 2/3 (hf_gemma): norms after branches
        g.norm(f"{block}.input_layernorm", before, bias=False)
        attn_out, values = attention_graph(g, f"{block}.self_attn", name, before, names, heads, kv_heads)
        if sandwich:  # the branch as the residual adds it: normalised, scaled by its own gain
            g.norm(f"{block}.post_attention_layernorm", attn_out, bias=False)
            g.probe(attn_out, f"{block}.post_attention_layernorm")
        g.residual(middle, before, attn_out)
        pre_mlp = f"{block}.pre_feedforward_layernorm" if sandwich else f"{block}.post_attention_layernorm"
        g.probe(middle, pre_mlp, "input")
        g.norm(pre_mlp, middle, bias=False)
        hidden, mlp_out = gated_mlp_graph(g, f"{block}.mlp", name, middle, names)
        if sandwich:
            g.norm(f"{block}.post_feedforward_layernorm", mlp_out, bias=False)
            g.probe(mlp_out, f"{block}.post_feedforward_layernorm")
        g.residual(after, middle, mlp_out)
        g.probe(after, block)
        signed |= {before, middle, after, attn_out, mlp_out, hidden} | values
    last = g.point(2 * cfg.num_hidden_layers)
    g.norm("model.norm", last, bias=False)
    if "lm_head.weight" in names:  # untied: the head reads the normalised last point
        g.param("lm_head.weight", None, In(last))
    g.graph.signed = signed
    # pre-norm: every RMSNorm reads the stream and feeds only its branch (a post-norm's gain cannot fold)
    g.graph.rotations = None if any(".post_feedforward_layernorm." in n for n in names) else "rms"
    g.graph.tokens = TokenLayout(cls=None, grid=None, prefix=0)
    return g.graph


def attention_graph(
    g: GraphBuilder, attn: str, name: str, reads: str, names: set[str], heads: int, kv_heads: int,
) -> tuple[str, set[str]]:
    """The attention module at ``attn`` reading stream point ``reads`` (normalised): Q/K/V under
    RoPE and GQA (biases where ``names`` has them), Qwen3-style ``q_norm``/``k_norm`` (one gain over
    head_dim, shared by every head: fixed), ``o_proj`` writing ``{name}.attn_out``, all probed.
    Returns that space and the value spaces, whose dimensions may flip sign."""
    q, k, v = g.attention(f"{name}.attn", heads, kv_heads, rope=True)
    source = Probe(f"{attn}.q_proj", "input")  # the normalised stream all three read
    for space, proj in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        bias = f"{attn}.{proj}.bias" in names
        g.linear(f"{attn}.{proj}", space, reads, bias=bias)
        g.probe(space, f"{attn}.{proj}", linear=Linear(source, f"{attn}.{proj}.weight", f"{attn}.{proj}.bias" if bias else None))
    for norm in ("q_norm", "k_norm"):
        if f"{attn}.{norm}.weight" in names:
            g.param(f"{attn}.{norm}.weight", None)
    values = g.graph.attention[-1].o or v
    attn_out = f"{name}.attn_out"
    g.linear(f"{attn}.o_proj", attn_out, values, bias=f"{attn}.o_proj.bias" in names)
    g.probe(attn_out, f"{attn}.o_proj")
    return attn_out, {v, values}


def gated_mlp_graph(g: GraphBuilder, mlp: str, name: str, reads: str, names: set[str]) -> tuple[str, str]:
    """The gated MLP at ``mlp`` (``gate_proj`` and ``up_proj`` reading ``reads`` into one hidden
    space, ``down_proj`` writing ``{name}.mlp_out``), probed. The gate's activation is not odd, so
    its row keeps its sign under a flip. Returns the hidden space and ``{name}.mlp_out``."""
    hidden, mlp_out = f"{name}.mlp", f"{name}.mlp_out"
    bias = f"{mlp}.up_proj.bias" in names
    g.param(f"{mlp}.gate_proj.weight", Out(hidden, magnitude=True), In(reads))
    if bias:
        g.param(f"{mlp}.gate_proj.bias", Out(hidden, magnitude=True))
    g.linear(f"{mlp}.up_proj", hidden, reads, bias=bias)
    g.probe(hidden, f"{mlp}.down_proj", "input")
    g.linear(f"{mlp}.down_proj", mlp_out, hidden, bias=bias)
    g.probe(mlp_out, f"{mlp}.down_proj")
    return hidden, mlp_out


def widened(model: nn.Module, units: int | None, heads: tuple[int, int] | None = None) -> nn.Module:
    return widened_hf(model, "intermediate_size", units, heads)


def tiny() -> LlamaForCausalLM:
    """A small random model of the family (``tfuse check-family``): GQA 4/2, RoPE, untied, Q/K/V biases."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        attention_bias=True))


def owns(model) -> bool:
    return isinstance(model, CLASSES)


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a LLaMA-family causal LM."""
    return checkpoint_config(path, label, "hf_llama")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> nn.Module:
    return load_causal_lm(path, revision, dtype, "hf_llama")
