"""fusion.width: partial fusion keeps the MLP units (and with fusion.widen=[mlp,heads], the heads)
it does not merge. Width N keeps every unit of every parent (each MLP and attention block the
alpha-weighted sum of the aligned parents'), width 1 is plain fusion, and the aligned parents
widened for the repair keep their function."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tfuse.arch import family, family_for
from tfuse.errors import TfuseError
from tfuse.fusion.methods import Calibration
from tfuse.fusion.methods.ot import OT, OTSettings, ot_fuse
from tfuse.fusion.partial import widths

VOCAB = 61
UNITS = 48
BUILDERS = {
    "hf_llama": (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=UNITS, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)), lambda m, i: m.model.layers[i].mlp),
    "hf_gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                                   n_inner=UNITS)), lambda m, i: m.transformer.h[i].mlp),
}


BUILDERS["hf_llama_48"] = (lambda: LlamaForCausalLM(LlamaConfig(  # 6 heads of 8 divide the stream of 48
    vocab_size=VOCAB, hidden_size=48, intermediate_size=UNITS, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8)), None)


def parents(fam: str):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(BUILDERS[fam][0]().eval())
    return out


def batches():
    gen = torch.Generator().manual_seed(5)
    data = [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=gen)} for _ in range(6)]
    return lambda: iter(data)


def settings(width: float, widen=("mlp",)) -> OTSettings:
    return OTSettings(solver="emd", tokens="all", residual="global", qk="head_aware", samples=24, batch_size=4,
                      width=width, widen=widen, alpha=[0.3, 0.7])


def fused_with(fam: str, width: float, widen=("mlp",)):
    models = parents(fam)
    calibration = Calibration(batches(), lambda b: b)
    return models, OT().fuse(models, family_for(models[0]).graph(models[0]), 0, calibration, settings(width, widen))


@pytest.mark.parametrize("fam", ["hf_llama", "hf_gpt2"])
def test_width_n_keeps_every_unit_of_every_parent(fam):
    models, outcome = fused_with(fam, 2.0)
    assert outcome.info["width"] == {"factor": 2.0, "mlp": {"units": UNITS, "merged": 0, "width": 2 * UNITS},
                                     "parameters": sum(p.numel() for p in outcome.model.parameters())}
    wide = outcome.aligned()
    mlp = BUILDERS[fam][1]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in range(2):
            want = 0.3 * mlp(wide[0], layer)(x) + 0.7 * mlp(wide[1], layer)(x)
            torch.testing.assert_close(mlp(outcome.model, layer)(x), want, atol=1e-5, rtol=1e-5)
        for parent, aligned in zip(models, wide):  # widened without changing the function
            batch = next(batches()())
            torch.testing.assert_close(aligned(**batch).logits, parent(**batch).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fam", ["hf_llama", "hf_gpt2"])
def test_width_one_is_plain_fusion(fam):
    models, outcome = fused_with(fam, 1.0)
    plain = ot_fuse(models, family(fam).graph(models[0]), settings(1.0), 0, batches(), lambda b: b)
    assert "width" not in outcome.info
    for (name, w), v in zip(outcome.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(w, v, msg=name)


def test_a_middle_width_merges_the_cheapest_groups(tmp_path):
    from transformers import AutoModelForCausalLM

    models, outcome = fused_with("hf_llama", 1.5)
    merged, width = widths(1.5, UNITS, 2)
    assert (merged, width) == (24, 72) and outcome.info["width"]["mlp"]["width"] == 72
    assert outcome.model.config.intermediate_size == 72
    outcome.model.save_pretrained(tmp_path / "fused")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    batch = next(batches()())
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, outcome.model(**batch).logits)


def test_widths_outside_one_to_n_are_one_line():
    with pytest.raises(TfuseError, match="between 1 .* and 2"):
        fused_with("hf_llama", 2.5)
    with pytest.raises(TfuseError, match="fusion.iterations=1"):
        OTSettings(width=1.5, iterations=2)


def test_the_cheapest_groups_are_merged_and_the_rest_kept_per_parent():
    from types import SimpleNamespace

    from tfuse.fusion.graph import FlowGraph, In, Out
    from tfuse.fusion.partial import Units, widen

    graph = FlowGraph(params={"up": (Out("h"), None), "down": (None, In("h"))}, probes={})
    plan = SimpleNamespace(where={"h": ("h", 0)})
    states = [{"up": torch.tensor([[1.0], [2.0], [3.0]]) + 10 * p, "down": torch.tensor([[1.0, 2.0, 3.0]]) + 10 * p}
              for p in (0, 1)]
    units = {"mlp": [Units({"h": 1}, torch.tensor([0.5, 0.1, 0.9]))]}
    wide, shapes = widen(states, graph, plan, units, 5 / 3)  # 3 units -> 5: one merged
    assert (shapes["mlp"].merged, shapes["mlp"].width) == (1, 5)
    # slots: unit 1 merged (the cheapest), then units 0 and 2 of parent 0, then of parent 1
    assert wide[0]["up"][:, 0].tolist() == [2.0, 1.0, 3.0, 11.0, 13.0]
    assert wide[1]["up"][:, 0].tolist() == [12.0, 1.0, 3.0, 11.0, 13.0]
    assert wide[0]["down"][0].tolist() == [2.0, 1.0, 3.0, 0.0, 0.0]
    assert wide[1]["down"][0].tolist() == [12.0, 0.0, 0.0, 11.0, 13.0]


def test_only_the_mlps_are_widened_not_a_classifiers_pooler():
    from transformers import BertConfig, BertForSequenceClassification

    from tfuse.fusion.partial import mlp_spaces
    from tfuse.fusion.plan import make_plan

    model = BertForSequenceClassification(BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=48))
    graph = family("hf_bert").graph(model)
    assert mlp_spaces(graph, make_plan(graph, OTSettings(residual="global"))) == ["layers.0.mlp", "layers.1.mlp"]


def test_width_n_with_heads_keeps_every_head_of_every_parent():
    """Heads widened too: every key/value group of both parents kept, query/key/value rows
    concatenated, the output projection's columns scaled by each owner's alpha, so each attention
    block is the alpha-weighted sum of the aligned parents'."""
    models, outcome = fused_with("hf_llama", 2.0, ("mlp", "heads"))
    fused = outcome.model
    assert outcome.info["width"]["heads"] == {"units": 2, "merged": 0, "width": 4}
    assert (fused.config.num_attention_heads, fused.config.num_key_value_heads, fused.config.head_dim) == (8, 4, 8)
    wide = outcome.aligned()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    position = fused.model.rotary_emb(x, torch.arange(5)[None])
    with torch.no_grad():
        for layer in range(2):
            attn = lambda m: m.model.layers[layer].self_attn(x, position_embeddings=position, attention_mask=None)[0]  # noqa: E731
            torch.testing.assert_close(attn(fused), 0.3 * attn(wide[0]) + 0.7 * attn(wide[1]), atol=1e-5, rtol=1e-5)
        for parent, aligned in zip(models, wide):
            batch = next(batches()())
            torch.testing.assert_close(aligned(**batch).logits, parent(**batch).logits, atol=1e-4, rtol=1e-4)


def test_a_middle_width_with_heads_merges_the_cheapest_group_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    models, outcome = fused_with("hf_llama_48", 1.5, ("heads",))
    assert outcome.info["width"]["heads"] == {"units": 2, "merged": 1, "width": 3} and "mlp" not in outcome.info["width"]
    config = outcome.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (6, 3, UNITS)
    outcome.model.save_pretrained(tmp_path / "fused")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    batch = next(batches()())
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, outcome.model(**batch).logits)
        for parent, aligned in zip(models, outcome.aligned()):  # a merged group, then each parent's own: function kept
            torch.testing.assert_close(aligned(**batch).logits, parent(**batch).logits, atol=1e-4, rtol=1e-4)


def test_heads_are_widened_only_where_the_head_width_is_free():
    with pytest.raises(TfuseError, match="6 query heads make no valid LlamaConfig .*divides hidden_size 32"):
        fused_with("hf_llama", 1.5, ("mlp", "heads"))
    with pytest.raises(TfuseError, match="hf_gpt2 derives each head's width from the stream's"):
        fused_with("hf_gpt2", 2.0, ("mlp", "heads"))
    with pytest.raises(TfuseError, match="needs whole-head maps: set fusion.qk=head_aware"):
        OTSettings(width=2.0, widen=["heads"])
    with pytest.raises(TfuseError, match=r"fusion.widen=\['stream'\]: choose one or more of mlp, heads"):
        OTSettings(width=2.0, widen=["stream"])
    assert OTSettings(width=1.0, widen=["mlp", "heads"]).qk == "separate"  # width 1 widens nothing: a sweep's first point
