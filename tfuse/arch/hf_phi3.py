"""Hugging Face Phi-3 causal LMs (``Phi3ForCausalLM``; Phi-4-mini shares its ``model_type``):
LLaMA's pre-norm layout (RMSNorm, RoPE, SwiGLU, grouped-query attention) with Q, K and V stored
as one ``qkv_proj`` and the SwiGLU's gate and up as one ``gate_up_proj``, described as a flow
graph as LLaMA's (``hf_llama.graph``) whose Q, K, V, gate and up are virtual parameters, views of
the two fused ones.

Symmetries the graph claims (those of ``hf_llama``):

* the residual stream: one map for every point, *signed* (RMSNorm does not centre); the RMSNorm
  gains keep their sign (``magnitude``); it rotates once the gains are folded (``rotations="rms"``);
* ``qkv_proj`` rows are ``[q; k; v]`` of ``heads``, ``kv_heads`` and ``kv_heads`` heads: under GQA
  the parts differ in size, so the view splits in the proportions ``heads : kv_heads : kv_heads``;
* attention: RoPE rotates fixed pairs of Q/K dimensions, so only whole heads move; a key/value
  group moves with its query heads, which may reorder inside the group; value dimensions permute
  (and flip) with the output projection's columns of every query head of the group. A partial
  rotary factor (Phi-4-mini: 0.75) leaves a head's last Q/K dimensions unrotated: those move
  freely inside their head, jointly in Q and K (``Attention.rotary``);
* ``gate_up_proj`` rows are ``[gate; up]`` (``Phi3MLP`` chunks gate first): both write one hidden
  space that ``down_proj`` reads; an ``up``/``down`` pair may flip sign, the ``gate`` row may not
  (SiLU is not odd);
* tied input and output embeddings (Phi-4-mini) are transported once; an untied ``lm_head``
  reads the normalised last point.

The attention and residual dropouts are identities at evaluation (and 0 in the configs built here).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from tfuse.arch.base import checkpoint_config, rotary_dims, widened_hf
from tfuse.arch.hf_llama import graph as llama_graph
from tfuse.arch.tokenized import attach_tokenizer, load_causal_lm, load_tokenizer, save, special_ids, tokenizer_of
from tfuse.fusion.graph import FlowGraph, Linear, Probe, Split

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's text functions

causal_lm = True


def config(hidden: int, mlp: int, depth: int, heads: int, kv_heads: int, vocab: int, **extra) -> Phi3Config:
    """A Phi-3 config; ``extra``: ``head_dim`` (None: ``hidden / heads``; written into the config,
    which Phi-3's own leaves out, so that parents whose heads differ under RoPE are refused),
    ``rope_theta``, ``partial_rotary_factor`` and any other ``Phi3Config`` key."""
    rope = {"rope_type": "default", "rope_theta": extra.pop("rope_theta", 10000.0),
            "partial_rotary_factor": extra.pop("partial_rotary_factor", 1.0)}
    return Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, rope_parameters=rope,
                      head_dim=extra.pop("head_dim", None) or hidden // heads, **extra)


def build(cfg, task) -> Phi3ForCausalLM:
    """A fresh Phi-3 from the ``model`` config group for a causal-LM task's tokenizer."""
    tokenizer = task.tokenizer
    return attach_tokenizer(Phi3ForCausalLM(config(
        cfg.hidden_size, cfg.mlp_size, cfg.depth, cfg.heads, cfg.get("kv_heads") or cfg.heads, len(tokenizer),
        head_dim=cfg.get("head_dim"), rope_theta=cfg.get("rope_theta", 10000.0),
        partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0),
        max_position_embeddings=max(cfg.get("max_position", 0) or 0, task.max_length),
        tie_word_embeddings=cfg.get("tie_embeddings", False), attention_dropout=cfg.get("dropout", 0.0),
        **special_ids(tokenizer),
    )), tokenizer)


def graph(model: nn.Module) -> FlowGraph:
    """LLaMA's graph (its virtual ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``
    under Phi-3's module paths), with Q, K and V observed in their slices of ``qkv_proj``'s output
    and, under partial RoPE, only the rotated Q/K dimensions pinned."""
    g = llama_graph(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = rotary_dims(cfg, head_dim)
    if rotary < head_dim:
        g.attention = [dataclasses.replace(att, rotary=rotary) for att in g.attention]
    projs = ("q_proj", "k_proj", "v_proj")
    for layer, att in enumerate(g.attention):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        shares = (att.heads, att.kv_heads or att.heads, att.kv_heads or att.heads)
        qkv = f"{attn}.qkv_proj"
        for i, (space, proj) in enumerate(zip((att.q, att.k, att.v), projs)):
            g.probes[space] = Probe(qkv, part=(i, shares), linear=Linear(Probe(qkv, "input"), f"{attn}.{proj}.weight"))
        g.views[f"{qkv}.weight"] = Split(0, tuple(f"{attn}.{proj}.weight" for proj in projs), shares)
        g.views[f"{mlp}.gate_up_proj.weight"] = Split(0, (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"))
    return g


def widened(model: nn.Module, units: int) -> nn.Module:
    return widened_hf(model, "intermediate_size", units)


def tiny() -> Phi3ForCausalLM:
    """A small random model of the family (``tfuse check-family``): GQA 4/2, RoPE, untied head."""
    torch.manual_seed(0)
    return Phi3ForCausalLM(config(32, 48, 2, 4, 2, 61, bos_token_id=0, eos_token_id=0, pad_token_id=None))


def owns(model) -> bool:
    return isinstance(model, Phi3ForCausalLM)


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a Phi-3 causal LM."""
    return checkpoint_config(path, label, "hf_phi3")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> nn.Module:
    return load_causal_lm(path, revision, dtype, "hf_phi3")
