"""Hugging Face Gemma causal LMs (``Gemma2ForCausalLM``; ``Gemma3ForCausalLM``, the text-only
Gemma 3 ``gemma3_text``; ``GemmaForCausalLM``): LLaMA's attention (RoPE, grouped-query heads whose
head_dim is free of hidden / heads) and gated MLP, with Gemma's RMSNorm ``n(x) * (1 + w)``, the
embeddings scaled by ``sqrt(hidden)``, a GeGLU (``gelu_pytorch_tanh`` gate) and, from Gemma 2 on,
sandwich norms: ``post_attention_layernorm`` / ``post_feedforward_layernorm`` normalise each
branch's output before the residual add, ``pre_feedforward_layernorm`` reads the stream (plain
Gemma has LLaMA's two norms). Gemma 2/3 alternate sliding-window and global attention, Gemma 3
with a RoPE base per kind (``rope_parameters``), and may soft-cap the attention and final logits.

Symmetries the graph claims:

* the residual stream with its branch outputs: one map for every point, *signed*. Gemma's
  RMSNorm never centres, and ``n(x) * (1 + w)`` with ``x_i`` negated is the output with its
  ``i``-th coordinate negated and ``w`` unchanged, so every gain, the ``(1 + w)`` ones included,
  moves with the permutation and keeps its sign (``magnitude``). A post-norm normalises the
  branch output in its own coordinates (``attn_out`` / ``mlp_out``): it commutes with the
  stream's signed permutation, and its gain lives in that branch space;
* GeGLU: ``gate_proj`` and ``up_proj`` write one hidden space that ``down_proj`` reads; an
  ``up``/``down`` pair may flip sign, the ``gate`` row may not (GELU is not odd);
* attention: RoPE rotates fixed pairs of Q/K dimensions, so only whole heads move; under GQA a
  key/value group moves with its query heads, which may reorder inside the group; value
  dimensions permute and flip with the output projection's columns; Gemma 3's ``q_norm`` /
  ``k_norm`` is a ``(1 + w)`` RMSNorm over head_dim whose gain every head shares: fixed, like
  Qwen3's in ``hf_llama``. Soft-capping (``tanh`` of the logits) and the embedding scale act on
  values no map moves (attention scores, vocabulary logits) or are one scalar;
* tied input and output embeddings: the table is transported once; the head reads the final
  norm's output.

No rotations (``fusion.maps=orthogonal`` is refused in one line): folding sets a norm's weight to
one, a gain of two under ``1 + w``; and a post-norm's gain scales the branch after normalising
it, so no layer can absorb it (only the residual add reads the branch), and a post-norm with a
gain does not commute with a rotation of the stream.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaForCausalLM,
)

from tfuse.arch.base import checkpoint_config, variant, widened_hf
from tfuse.arch.hf_llama import graph as llama_graph
from tfuse.arch.tokenized import attach_tokenizer, load_causal_lm, load_tokenizer, save, special_ids, tokenizer_of
from tfuse.fusion.graph import FlowGraph

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's text functions

CLASSES = (GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM)
VARIANTS = {"gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
causal_lm = True
widens_heads = True  # head_dim is the config's own: more heads (fusion.widen) leave the stream as it is


def build(cfg, task) -> nn.Module:
    """A fresh Gemma 2 or Gemma 3 (``model.variant``) from the ``model`` config group for a
    causal-LM task's tokenizer."""
    config_class, model_class = variant(cfg, VARIANTS, "gemma3")
    tokenizer = task.tokenizer
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.get("kv_heads") or cfg.heads,
        head_dim=cfg.get("head_dim") or cfg.hidden_size // cfg.heads,
        query_pre_attn_scalar=cfg.get("head_dim") or cfg.hidden_size // cfg.heads,
        max_position_embeddings=max(cfg.get("max_position", 0) or 0, task.max_length),
        sliding_window=cfg.get("sliding_window", 4096),
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        attention_dropout=cfg.get("dropout", 0.0),
        **special_ids(tokenizer),
    )
    return attach_tokenizer(model_class(config), tokenizer)


def graph(model: nn.Module) -> FlowGraph:
    """LLaMA's graph, which also describes the sandwich norms (``hf_llama.graph``; the embedding
    probe sees the stream after the sqrt(hidden) scale), without rotations: folding a ``(1 + w)``
    gain would leave a gain of two."""
    g = llama_graph(model)
    g.rotations = None
    return g


def widened(model: nn.Module, units: int | None, heads: tuple[int, int] | None = None) -> nn.Module:
    return widened_hf(model, "intermediate_size", units, heads)


def tiny() -> Gemma3ForCausalLM:
    """A small random Gemma 3 (``tfuse check-family``): GQA 4/2 with head_dim 16 (not hidden /
    heads), q_norm / k_norm, a sliding layer whose window is shorter than the inputs and a global
    one, both logits soft-capped, untied."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))


def owns(model) -> bool:
    return isinstance(model, CLASSES)


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a Gemma causal LM."""
    return checkpoint_config(path, label, "hf_gemma")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> nn.Module:
    return load_causal_lm(path, revision, dtype, "hf_gemma")
