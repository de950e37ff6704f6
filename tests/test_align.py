"""fusion.align: the kinds of space OT aligns (an ablation of which maps help). The spaces of a kind
left out keep the identity while the others get the maps a full alignment finds; with nothing
aligned, OT is the plain average."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tfuse.arch import family
from tfuse.errors import TfuseError
from tfuse.fusion.apply import average
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods import Calibration
from tfuse.fusion.methods.ot import OT, OTSettings

VOCAB = 61


def parents():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                              n_inner=48)).eval())
    return out


def token_batches(count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=gen)} for _ in range(count)]


def fused(models, align, fam: str = "hf_gpt2", batches: int = 6):
    """OT (hard, global stream, head-aware) of ``models`` aligning the kinds ``align``."""
    data = token_batches(batches)
    settings = OTSettings(solver="emd", tokens="all", residual="global", qk="head_aware", samples=4 * batches,
                          batch_size=4, align=align)
    return OT().fuse(models, family(fam).graph(models[0]), 0, Calibration(lambda: iter(data), lambda b: b), settings)


def kinds(space: str) -> str:
    return "stream" if space.startswith("stream") else "heads" if ".attn." in space else "mlp"


@pytest.fixture(scope="module")
def full():
    models = parents()
    return models, fused(models, ["stream", "heads", "mlp"])


@pytest.mark.parametrize("align", [["stream"], ["heads", "mlp"], ["stream", "mlp"]])
def test_left_out_spaces_keep_the_identity_and_the_rest_their_maps(full, align):
    models, whole = full
    part = fused(models, align)
    maps, reference = part.maps[1], whole.maps[1]
    assert {kinds(s) for s in maps} == {"stream", "heads", "mlp"}
    identity = lambda n: torch.eye(n, dtype=torch.float64) / n  # noqa: E731
    for space in maps:
        if kinds(space) in align:
            assert torch.equal(maps[space], reference[space]), space
        else:
            assert torch.equal(maps[space], identity(maps[space].shape[0])), space
    for kind in ("stream", "heads", "mlp"):  # the full alignment moves every kind: the identity is a real change
        assert any(not torch.equal(reference[s], identity(reference[s].shape[0])) for s in reference if kinds(s) == kind)


def test_nothing_aligned_is_the_plain_average():
    models = parents()
    outcome = fused(models, [])
    want = average([parameters(m) for m in models], [0.5, 0.5])
    got = dict(outcome.model.named_parameters())
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-6), name


@pytest.mark.parametrize("extra, says", [
    ({"align": ["stream", "neurons"]}, "'neurons' is not a kind of space; choose from stream, heads, mlp"),
    ({"align": ["stream"], "learn_steps": 5}, "keeps some spaces unaligned, which fusion.learn_steps would align"),
])
def test_bad_alignments_are_one_line(extra, says):
    with pytest.raises(TfuseError, match=says):
        OTSettings(residual="global", **extra)


def test_grouped_heads_left_out_keep_the_identity_and_the_model_its_function():
    """LLaMA with GQA (4 query heads over 2 key/value heads): the query, key, value and output-
    projection spaces all keep the identity; fused with itself, the model is unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    outcome = fused([model, model], ["stream", "mlp"], "hf_llama", batches=4)
    heads = [s for s in outcome.maps[1] if ".attn." in s]
    assert any(s.endswith(".o") for s in heads)
    for space in heads:
        n = outcome.maps[1][space].shape[0]
        assert torch.equal(outcome.maps[1][space], torch.eye(n, dtype=torch.float64) / n), space
    with torch.no_grad():
        batch = token_batches(1)[0]
        torch.testing.assert_close(outcome.model(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_unequal_widths_left_unaligned_are_one_line():
    small, wide = parents()[0], GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                            n_positions=16, n_inner=64)).eval()
    with pytest.raises(TfuseError, match=r"fusion.align leaves space 'layers.0.mlp' unaligned, but its widths differ \(64 vs 48\)"):
        fused([small, wide], ["stream", "heads"], batches=4)
