"""Hugging Face BERT (``BertForMaskedLM``, ``BertForSequenceClassification``, bare ``BertModel``)
and the RoBERTa and XLM-R classes of the same layout (their MLM head is ``lm_head``, their
classifier a dense and tanh on the first token; position ids offset by the padding id, which the
model computes itself): post-LN blocks, described as a flow graph for the generic engine.

Post-LN: ``x -> LN(x + attn(x)) -> LN(. + mlp(.))``. A block's LayerNorm sits on the residual
point itself, so its gain and shift live in that stream point and the probe is the LayerNorm's
output (what the next block reads). The word, position and token-type tables and their LayerNorm
write the first stream point. The MLM head's decoder is tied to the word embeddings, so the head's
transform (dense, GELU, LayerNorm) must write the embeddings' space ``stream.0``: the tied matrix is
transported once, as the embedding table it is. The pooler writes a space of its own (one vector
per sequence: its probe has no token axis); the classifier reads it and keeps its classes.

A tokenizer travels with each model (``model.tfuse_tokenizer``): ``load`` reads it from the
checkpoint directory and ``save`` writes it beside the weights, so parents, fused and finetuned
models all carry the one tokenizer their token ids mean something in.

A ``TextFamily`` (``tfuse.arch.base``): the text tasks and the downstream stage reach BERT's heads
and tokenizer through these functions only.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, RobertaForMaskedLM,
    RobertaForSequenceClassification, RobertaModel, XLMRobertaForMaskedLM, XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

from tfuse.arch.base import checkpoint_config, widened_hf
from tfuse.arch.tokenized import attach_tokenizer, load_tokenizer, save, tokenizer_of
from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph, GraphBuilder, In, Out, TokenLayout

__all__ = ["attach_tokenizer", "load_tokenizer", "save", "tokenizer_of"]  # the family's TextFamily functions

# per layout: (masked LM, sequence classifier, bare encoder)
LAYOUTS = ((BertForMaskedLM, BertForSequenceClassification, BertModel),
           (RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel),
           (XLMRobertaForMaskedLM, XLMRobertaForSequenceClassification, XLMRobertaModel))
CLASSES = {cls.__name__: cls for layout in LAYOUTS for cls in layout}
HEADS = {"mlm": BertForMaskedLM, "classification": BertForSequenceClassification, "none": BertModel}
MASKED = tuple(layout[0] for layout in LAYOUTS)
ROBERTA_CLASSIFIERS = tuple(layout[1] for layout in LAYOUTS[1:])  # a dense + tanh head on the first token
BARE = tuple(layout[2] for layout in LAYOUTS)
CLASSIFIERS = {cls: layout[1] for layout in LAYOUTS for cls in layout}  # the classifier of each layout
BERT_HEAD = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias",
             "cls.predictions.decoder")
ROBERTA_HEAD = ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder")


def build(cfg, task) -> nn.Module:
    """A fresh BERT sized by the ``model`` config, with the head the task needs (``task.head``)."""
    tokenizer = task.tokenizer
    head = getattr(task, "head", None) or cfg.get("head", "mlm")
    if head not in HEADS:
        raise TfuseError(f"model.head={head!r} is not known; allowed: {', '.join(HEADS)}")
    dropout = cfg.get("dropout", 0.1)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_size,
        max_position_embeddings=max(cfg.get("max_position", 0) or 0, task.max_length),
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=getattr(task, "num_labels", 2),
    )
    return attach_tokenizer(HEADS[head](config), tokenizer)


def graph(model: nn.Module) -> FlowGraph:
    cfg = model.config
    base = "" if isinstance(model, BARE) else f"{model.base_model_prefix}."
    g = GraphBuilder()
    s0 = g.point(0)
    emb = f"{base}embeddings"
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        g.param(f"{emb}.{table}.weight", None, Out(s0))
    g.norm(f"{emb}.LayerNorm", s0)
    g.probe(s0, emb)
    for layer in range(cfg.num_hidden_layers):
        block, name = f"{base}encoder.layer.{layer}", f"layers.{layer}"
        g.graph.blocks.append(block)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        projections = tuple(f"{block}.attention.self.{p}" for p in ("query", "key", "value")) + (
            f"{block}.attention.output.dense",
        )
        attn_out = g.attention_block(name, cfg.num_attention_heads, before, projections)
        g.residual(middle, before, attn_out)
        g.norm(f"{block}.attention.output.LayerNorm", middle)  # post-LN: on the residual point
        g.probe(middle, f"{block}.attention.output.LayerNorm")
        mlp_out = g.mlp_block(
            name, middle, f"{block}.intermediate.dense", f"{block}.intermediate.intermediate_act_fn", f"{block}.output.dense"
        )
        g.residual(after, middle, mlp_out)
        g.norm(f"{block}.output.LayerNorm", after)
        g.probe(after, f"{block}.output.LayerNorm")
    last = g.point(2 * cfg.num_hidden_layers)
    names = {n for n, _ in model.named_parameters()}
    if f"{base}pooler.dense.weight" in names:
        g.linear(f"{base}pooler.dense", "pooler", last)
        g.probe("pooler", f"{base}pooler.activation")  # (batch, width): one sample per sequence
    if isinstance(model, BertForSequenceClassification):
        g.linear("classifier", None, "pooler")  # classes are never permuted
    if isinstance(model, ROBERTA_CLASSIFIERS):  # dense (and tanh) on the first token, then the classes
        g.linear("classifier.dense", "pooler", last)
        g.probe("pooler", "classifier.dense")  # (batch, width)
        g.linear("classifier.out_proj", None, "pooler")
    if isinstance(model, MASKED):
        dense, norm, bias, decoder = _mlm_head(model)
        # The decoder is tied to the word embeddings, whose columns live in stream.0: the
        # transform must write that same space for the tied matrix to read it.
        g.linear(dense, s0, last)
        g.norm(norm, s0)
        g.param(bias, None)
        if f"{decoder}.weight" in names:  # untied checkpoint
            g.param(f"{decoder}.weight", None, In(s0))
        if f"{decoder}.bias" in names:
            g.param(f"{decoder}.bias", None)
    g.graph.tokens = TokenLayout(cls=0, grid=None, prefix=1)
    return g.graph


def widened(model: nn.Module, units: int) -> nn.Module:
    return widened_hf(model, "intermediate_size", units)


def tiny() -> nn.Module:
    """A small random model of the family (``tfuse check-family``)."""
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32))


def owns(model) -> bool:
    return isinstance(model, tuple(CLASSES.values()))


def has_head(model: nn.Module) -> bool:
    return not isinstance(model, BARE)


def masked_logits(model: nn.Module, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """The MLM head's logits at the ``keep`` positions only (rows in ``hidden[keep]`` order): the
    head is per token, so this equals ``model(**inputs).logits[keep]`` without the vocabulary-wide
    projection of the other 85% of the tokens."""
    if not isinstance(model, MASKED):
        raise TfuseError(f"{type(model).__name__} has no masked-LM head; MLM needs BertForMaskedLM or RobertaForMaskedLM")
    hidden = model.base_model(**inputs).last_hidden_state
    return getattr(model, _mlm_head(model)[0].split(".")[0])(hidden[keep])


def _mlm_head(model: nn.Module) -> tuple[str, str, str, str]:
    """The MLM head's transform dense, its LayerNorm, the output bias, the decoder (tied to the word table)."""
    return BERT_HEAD if isinstance(model, BertForMaskedLM) else ROBERTA_HEAD


def to_classifier(model: nn.Module, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier around ``model``'s encoder; pooler/classifier from a fixed seed."""
    cls = CLASSIFIERS[type(model)]
    config = copy.deepcopy(model.config)
    config.num_labels, config.architectures = num_labels, [cls.__name__]
    config.id2label = {i: str(i) for i in range(num_labels)}
    config.label2id = {str(i): i for i in range(num_labels)}
    torch.manual_seed(seed)
    clf = cls(config)
    result = clf.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    if any(not k.startswith("pooler.") for k in result.missing_keys + result.unexpected_keys):
        raise TfuseError(f"encoder weights do not fit a classifier: {result.missing_keys[:3]} {result.unexpected_keys[:3]}")
    return attach_tokenizer(clf.to(next(model.parameters()).device), tokenizer_of(model))


def check_directory(path: str, label: str) -> dict:
    """The checkpoint's config, after checking that it is a BERT (clear error otherwise)."""
    return checkpoint_config(path, label, "hf_bert")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> nn.Module:
    config = check_directory(path, f"checkpoint '{path}'") if Path(path).is_dir() else {}
    arch = (config.get("architectures") or ["BertForMaskedLM"])[0]
    cls = CLASSES.get(arch, BertForMaskedLM if "MaskedLM" in arch or "PreTraining" in arch else BertModel)
    model = cls.from_pretrained(path, revision=revision, dtype=dtype,
                                use_safetensors=(Path(path) / "model.safetensors").exists() or None)
    return attach_tokenizer(model, load_tokenizer(path, revision))
