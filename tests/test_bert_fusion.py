"""METHOD.md section 6 properties on tiny random BERTs, for every head type (MLM, sequence
classification, bare encoder), plus padding invariance of the statistics."""
import itertools

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from tfuse.arch import hf_bert
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.methods.vanilla import vanilla_fuse
from tfuse.fusion.plan import make_plan
from tfuse.fusion.statistics import collect_statistics
from tfuse.symmetry import permuted_copy

HEADS = {"mlm": BertForMaskedLM, "cls": BertForSequenceClassification, "bare": BertModel}
inputs_only = lambda batch: {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}  # noqa: E731


def tiny_bert(head: str = "mlm", seed: int = 0, hidden: int = 32, mlp: int = 64, heads: int = 4, depth: int = 2):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return HEADS[head](config).eval()


def text_batches(n: int = 24, length: int = 12, seed: int = 1, pad_from: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, length), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones(n, length, dtype=torch.long)
    if pad_from is not None:  # ragged: example i keeps pad_from + i % (length - pad_from) tokens
        for i in range(n):
            keep = pad_from + i % (length - pad_from)
            mask[i, keep:] = 0
            ids[i, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def batches_of(data: dict, size: int):
    n = len(data["input_ids"])
    return lambda: ({k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size))


def outputs(model, data: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**data)
    if hasattr(out, "logits"):
        return out.logits
    h = out.last_hidden_state  # a bare encoder's basis is arbitrary: compare token Gram matrices
    return torch.cat([h @ h.transpose(1, 2), (out.pooler_output @ out.pooler_output.T)[:, None, :h.shape[1]]], dim=1)


def fuse(models, settings, data, anchor=0, batch=8):
    graph = hf_bert.graph(models[anchor])
    return ot_fuse(models, graph, settings, anchor, batches_of(data, batch), inputs_only).model


@pytest.mark.parametrize("head", list(HEADS))
def test_graph_describes_every_parameter_and_permuted_copy_is_the_same_function(head):
    model = tiny_bert(head)
    graph = hf_bert.graph(model)
    assert set(graph.params) == {n for n, _ in model.named_parameters()}
    copy = permuted_copy(model, graph, seed=3)
    name = next(n for n in graph.params if n.endswith("layer.0.intermediate.dense.weight"))
    assert not torch.equal(parameters(copy)[name], parameters(model)[name])
    data = text_batches(pad_from=5)
    torch.testing.assert_close(outputs(copy, data), outputs(model, data), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("residual,qk", list(itertools.product(OTSettings.CHOICES["residual"], OTSettings.CHOICES["qk"])))
def test_hard_fusion_with_permuted_copy_gives_back_the_model(head, residual, qk):
    model = tiny_bert(head)
    copy = permuted_copy(model, hf_bert.graph(model), seed=5)
    data = text_batches(pad_from=4)
    settings = OTSettings(solver="emd", residual=residual, qk=qk, tokens="all")
    fused = fuse([copy, model], settings, data, anchor=1)
    for name, w in parameters(model).items():
        torch.testing.assert_close(parameters(fused)[name], w, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(outputs(fused, data), outputs(model, data), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", ["cls", "random"])
def test_token_filters_and_weight_cost_keep_exact_recovery(tokens):
    model = tiny_bert("cls")
    copy = permuted_copy(model, hf_bert.graph(model), seed=2)
    data = text_batches(pad_from=4)
    settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens=tokens, token_count=4)
    torch.testing.assert_close(outputs(fuse([copy, model], settings, data, anchor=1), data), outputs(model, data), atol=1e-5, rtol=1e-5)
    weights = OTSettings(solver="emd", cost="weights", residual="global", qk="eq_t_map")
    fused = ot_fuse([copy, model], hf_bert.graph(model), weights, 1, None, inputs_only).model
    torch.testing.assert_close(outputs(fused, data), outputs(model, data), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
def test_self_fusion_exact_when_hard_and_converging_as_reg_shrinks(head):
    model = tiny_bert(head)
    data = text_batches(pad_from=4)
    hard = fuse([model, model], OTSettings(solver="emd", tokens="all"), data)
    torch.testing.assert_close(outputs(hard, data), outputs(model, data), atol=1e-5, rtol=1e-5)
    errors = []
    for reg in (0.3, 0.03, 0.003):
        soft = fuse([model, model], OTSettings(solver="sinkhorn", reg=reg, residual="global", tokens="all"), data)
        errors.append((outputs(soft, data) - outputs(model, data)).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[0] > 10 * errors[-1], errors


def test_widened_heterogeneous_fusion_runs_and_takes_the_anchor_widths():
    small, wide = tiny_bert("mlm", 0), tiny_bert("mlm", 1, hidden=48, mlp=96)
    data = text_batches()
    fused = fuse([wide, small], OTSettings(tokens="all", residual="global"), data, anchor=1)
    assert all(p.shape == q.shape for p, q in zip(fused.parameters(), small.parameters()))
    assert torch.isfinite(outputs(fused, data)).all()


def test_padding_does_not_change_the_statistics():
    a, b = tiny_bert("cls", 0), tiny_bert("cls", 1)
    graph = hf_bert.graph(b)
    settings = OTSettings(tokens="all", residual="weighted_matrix", qk="joint", center=True)  # center: sums kept
    plan = make_plan(graph, settings)
    data = text_batches(n=6, length=10)
    padded = {k: torch.cat([v, torch.zeros(len(v), 7, dtype=v.dtype)], dim=1) for k, v in data.items()}
    padded["input_ids"][:, 10:] = 0
    tight = collect_statistics([a], b, graph, plan, batches_of(data, 3)(), inputs_only, settings)
    loose = collect_statistics([a], b, graph, plan, batches_of(padded, 2)(), inputs_only, settings)
    for space, stats in tight.pairs[0].items():
        other = loose.pairs[0][space]
        assert stats.a.count == other.a.count
        for x, y in ((stats.cross, other.cross), (stats.a.sum, other.a.sum), (stats.b.sumsq, other.b.sumsq)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert "pooler" in tight.pairs[0] and tight.pairs[0]["pooler"].a.count == 6


def test_ot_differs_from_vanilla_and_vanilla_self_fusion_is_identity():
    a, b = tiny_bert("mlm", 0), tiny_bert("mlm", 1)
    data = text_batches()
    torch.testing.assert_close(outputs(vanilla_fuse([a, a], [0.5, 0.5]), data), outputs(a, data))
    ot_model = fuse([a, b], OTSettings(tokens="all"), data, anchor=1)
    assert not torch.allclose(outputs(ot_model, data), outputs(vanilla_fuse([a, b], [0.5, 0.5]), data))
    # the decoder stays tied to the word embeddings
    assert ot_model.cls.predictions.decoder.weight is ot_model.bert.embeddings.word_embeddings.weight


def test_masked_logits_equal_the_full_head_at_the_masked_positions():
    from tfuse.tasks.mlm import masked_logits

    model, data = tiny_bert("mlm"), text_batches(pad_from=6)
    keep = (torch.rand(data["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.15) & data["attention_mask"].bool()
    with torch.no_grad():
        full = model(**data).logits[keep]
        assert torch.allclose(masked_logits(model, data, keep), full, atol=1e-6)
    assert full.shape[0] == int(keep.sum()) > 0
