"""fusion.maps=orthogonal: norm gains folded keep the function; a copy whose stream is rotated
(any rotation under RMSNorm, one fixing the all-ones direction under LayerNorm) and whose value
dimensions are rotated inside every key/value head, on top of every permutation the graph
claims, is recovered exactly; post-LN streams are refused."""
import pytest
import torch
from transformers import (
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
    ViTForImageClassification,
)

from tfuse.arch import folded
from tfuse.errors import TfuseError
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.symmetry import rotated_copy, symmetric_copy

VOCAB = 61
BUILDERS = {
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16)),
    "vit": lambda: ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8, patch_size=4,
        num_channels=3, num_labels=3)),  # patches of 48 pixels: a stream of full rank
}


def built(kind: str, seed: int = 0):
    """A model with its norm gains and shifts moved off 1 and 0 (a wrong fold shows)."""
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def inputs(kind: str, n: int = 24):
    gen = torch.Generator().manual_seed(5)
    if kind == "vit":
        return [{"pixel_values": torch.randn(8, 3, 8, 8, generator=gen)} for _ in range(n // 8)]
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=gen)} for _ in range(n // 4)]


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_folding_the_gains_keeps_the_function(kind):
    model = built(kind)
    fold, graph = folded(model)
    for batch in inputs(kind):
        torch.testing.assert_close(outputs(fold, batch), outputs(model, batch), atol=1e-5, rtol=1e-5)
    for norm in (n for n, axes in graph.params.items() if axes == (None,) and n.endswith("weight")):
        assert torch.equal(dict(fold.named_parameters())[norm], torch.ones_like(dict(fold.named_parameters())[norm]))
    head = fold.get_output_embeddings()
    assert head is None or head.weight is not fold.get_input_embeddings().weight  # untied: the head took a gain


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_rotated_and_permuted_copy_is_recovered_exactly(kind):
    model, graph = folded(built(kind))
    copy = rotated_copy(symmetric_copy(model, graph, seed=1, signs=kind.startswith("llama")), graph, seed=2)
    for batch in inputs(kind):
        torch.testing.assert_close(outputs(copy, batch), outputs(model, batch), atol=1e-4, rtol=1e-4)
    assert max((a - b).abs().max() for a, b in zip(copy.parameters(), model.parameters()) if a.dim() > 1) > 0.1
    settings = OTSettings(maps="orthogonal", residual="global", solver="emd", tokens="all", samples=24, batch_size=8,
                          qk="head_aware", signs=kind.startswith("llama"))
    batches = inputs(kind)
    fused = ot_fuse([model, copy], graph, settings, 0, lambda: iter(batches), lambda b: b).model
    mine = dict(model.named_parameters())
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[name], atol=5e-4 * float(mine[name].abs().max()) + 1e-6, rtol=0)  # float32 maps


def test_the_fused_model_is_a_normal_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model, graph = folded(built("llama_tied"))
    copy = rotated_copy(model, graph, seed=3)
    settings = OTSettings(maps="orthogonal", residual="global", solver="emd", tokens="all", samples=24, batch_size=8,
                          qk="head_aware")
    batches = inputs("llama_tied")
    fused = ot_fuse([model, copy], graph, settings, 0, lambda: iter(batches), lambda b: b).model
    fused.save_pretrained(tmp_path / "fused")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    for batch in batches:
        torch.testing.assert_close(outputs(again, batch), outputs(fused, batch))


def test_post_ln_streams_and_other_policies_are_refused():
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48))
    with pytest.raises(TfuseError, match="does not admit rotations"):
        folded(bert)
    with pytest.raises(TfuseError, match="fusion.residual=global"):
        OTSettings(maps="orthogonal", residual="mean")
    with pytest.raises(TfuseError, match=r"without fusion.stream \(or set fusion.maps=permutation\)"):
        OTSettings(maps="orthogonal", residual="global", stream=True)
