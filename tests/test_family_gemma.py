"""Gemma, Gemma 2 and Gemma 3 (text): every symmetry the flow graph claims keeps the logits
(signed stream through the (1 + w) gains and the sandwich norms, GeGLU up/down, grouped RoPE heads
with head_dim free of hidden / heads, Gemma 3's shared q_norm / k_norm, sliding and global layers,
soft-capped logits); the claims it does not make would break the model; rotations are refused in
one line; fusion with a transformed copy gives the original back through the CLI, the family read
from config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM

from conftest import tfuse
from tfuse.arch import check_same_architecture, folded, hf_gemma
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.fusion.graph import Out
from tfuse.fusion.methods import METHODS, Calibration
from tfuse.selftest import off_init, outputs, self_test
from tfuse.symmetry import symmetric_copy, widened_copy

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)
SLIDING = dict(query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def gemma2(seed: int = 0, **change) -> Gemma2ForCausalLM:
    """Tied, GQA 4/2, head_dim 16, a window of 4 (inputs are 12 long) then a global layer, caps low
    enough that the tanh bends the logits."""
    torch.manual_seed(seed)
    config = {**SIZES, **SLIDING, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5}
    return Gemma2ForCausalLM(Gemma2Config(**{**config, **change})).eval()


def gemma3(vocab: int = 61, **change) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**SIZES, **SLIDING, "vocab_size": vocab, **change})).eval()


def gemma() -> GemmaForCausalLM:
    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(**{**SIZES, "num_key_value_heads": 4, "head_dim": 12})).eval()


MODELS = {
    "tiny": hf_gemma.tiny,  # Gemma 3: q_norm / k_norm, both caps, untied
    "gemma2_tied": gemma2,
    "gemma2_mha_head_dim": lambda: gemma2(num_key_value_heads=4, head_dim=12, query_pre_attn_scalar=12),
    "gemma3_tied_no_caps": gemma3,
    "gemma_plain": gemma,  # LLaMA's two norms, (1 + w) gains, GeGLU, scaled embeddings
}


@pytest.mark.parametrize("name", MODELS)
def test_every_variant_passes_the_self_test_with_signs(name):
    model = MODELS[name]()
    graph = hf_gemma.graph(model)
    assert hf_gemma.owns(model) and graph.signed and graph.rotations is None
    checks = self_test(model, hf_gemma.graph)
    assert [c.name for c in checks][-1] == "fused with that copy, the model comes back"
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_the_sandwich_norms_gains_live_in_the_branch_outputs_and_keep_their_sign():
    graph = hf_gemma.graph(gemma2())
    assert graph.params["model.layers.0.post_attention_layernorm.weight"] == (Out("layers.0.attn_out", magnitude=True),)
    assert graph.params["model.layers.0.post_feedforward_layernorm.weight"] == (Out("layers.0.mlp_out", magnitude=True),)
    assert graph.params["model.layers.0.pre_feedforward_layernorm.weight"] == (Out("stream.1", magnitude=True),)
    assert {"layers.0.attn_out", "layers.0.mlp_out", "stream.1"} <= graph.signed
    assert graph.probes["layers.0.attn_out"].module == "model.layers.0.post_attention_layernorm"
    qk_norm = hf_gemma.graph(hf_gemma.tiny()).params  # Gemma 3: over head_dim, shared by the heads: fixed
    assert qk_norm["model.layers.0.self_attn.q_norm.weight"] == qk_norm["model.layers.0.self_attn.k_norm.weight"] == (None,)


def _claiming(change):
    """The family's graph with ``change(name, axis)`` applied to every ``Out`` axis."""
    def graph(model):
        g = hf_gemma.graph(model)
        params = {n: tuple(change(n, ax) if isinstance(ax, Out) else ax for ax in axes) for n, axes in g.params.items()}
        return dataclasses.replace(g, params=params)
    return graph


@pytest.mark.parametrize("make", [gemma2, hf_gemma.tiny], ids=["gemma2", "gemma3"])
@pytest.mark.parametrize("part", ["gate_proj.weight", "norm.weight"], ids=["gate_signed", "gains_flip"])
def test_a_wrong_sign_claim_fails_the_self_test(make, part):
    """GELU is not odd: a flipped gate row breaks the GeGLU. A (1 + w) gain negated as stored
    gives 1 - w, not -(1 + w): the gains, the post-norms' too, keep their sign."""
    wrong = _claiming(lambda n, ax: Out(ax.space) if n.endswith(part) else ax)
    checks = {c.name: c for c in self_test(make(), wrong)}
    failed = checks["a copy under the graph's symmetries computes the same outputs"]
    assert not failed.passed and "output difference" in failed.detail


IDS = torch.randint(0, 61, (8, 12), generator=torch.Generator().manual_seed(7))
BATCHES = [{"input_ids": IDS[i:i + 4]} for i in (0, 4)]
HARD = dict(solver="emd", qk="head_aware", residual="global", tokens="all", samples=8, batch_size=4, signs=True)


def fuse(models, method="ot", anchor=0, **knobs):
    cls = METHODS[method].settings_class
    settings = cls(method=method, **{k: v for k, v in {**HARD, **knobs}.items() if k in cls.known()})
    source = lambda: iter(BATCHES)  # noqa: E731
    return METHODS[method].fuse(models, hf_gemma.graph(models[anchor]), anchor, Calibration(source, dict, 2, source), settings)


def relative(a: nn.Module, b: nn.Module) -> float:
    want = outputs(b, {"input_ids": IDS})
    return float((outputs(a, {"input_ids": IDS}) - want).abs().max() / want.abs().max())


def test_three_parents_repairs_and_a_wider_mlp_recover_the_model():
    """N parents under both repairs, and a parent whose GeGLU units are all duplicated (fusion
    across widths), fuse back into the anchor. (The stream cannot be widened alike: the embedding
    scale is sqrt(hidden).)"""
    model = off_init(gemma2(), 0)
    graph = hf_gemma.graph(model)
    copies = [symmetric_copy(model, graph, seed=s, signs=True) for s in (1, 2)]
    for repair in ("lstsq", "rescale"):
        assert relative(fuse([copies[0], model, copies[1]], anchor=1, repair=repair).model, model) < 1e-5
    mlps, wider = [s for s in graph.spaces() if s.endswith(".mlp")], hf_gemma.widened(model, 96)
    wide = symmetric_copy(widened_copy(model, graph, wider, mlps), hf_gemma.graph(wider), seed=3, signs=True)
    assert wide.config.intermediate_size == 96 and relative(wide, model) < 1e-5
    assert relative(fuse([wide, model], anchor=1).model, model) < 1e-5


@pytest.mark.parametrize("method", ["vanilla", "weight_matching", "ot"])
def test_every_method_fuses_two_seeds(method):
    outcome = fuse([gemma2(), gemma2(seed=1)], method=method, repair="lstsq", solver="sinkhorn")
    assert outcome.repair and all(f.after <= f.before + 1e-9 for f in outcome.repair)
    assert torch.isfinite(outputs(outcome.model, {"input_ids": IDS})).all()


def test_orthogonal_maps_are_refused_in_one_line():
    with pytest.raises(TfuseError, match="does not admit rotations") as err:
        folded(gemma2())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make, change, says", [
    (gemma3, {"rope_local_base_freq": 100.0}, "different RoPE settings"),
    (gemma2, {"final_logit_softcapping": 3.0}, "different final logit caps"),
    (gemma2, {"head_dim": 12}, "different head dimensions"),
])
def test_parents_whose_weights_mean_different_things_are_refused(make, change, says):
    with pytest.raises(TfuseError, match=says):
        check_same_architecture([make(), make(**change)], allow_widths=True)


# ---------------------------------------------------------------- from checkpoint directories


def test_the_cli_fuses_a_signed_copy_back_into_the_original(tmp_path: Path):
    """One run through the shell (Gemma 2 is recovered by the self-test above): a tied, soft-capped
    Gemma 3 whose norms are off their init, and a copy of it under a signed symmetry."""
    tokenizer = train_bpe(["def function(argument): return the value of a Python expression " * 40], 120)
    model = gemma3(vocab=len(tokenizer), attn_logit_softcapping=2.0, final_logit_softcapping=1.5)
    model = hf_gemma.attach_tokenizer(off_init(model, 0), tokenizer)
    twin = symmetric_copy(model, hf_gemma.graph(model), seed=1, signs=True)
    table = "model.embed_tokens.weight"
    assert not torch.equal(dict(twin.named_parameters())[table], dict(model.named_parameters())[table])
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    hf_gemma.save(model, str(a))
    hf_gemma.save(twin, str(b))
    proc = tfuse("fuse", f"parents=[{a},{b}]", "data=pydoc", "fusion.solver=emd", "fusion.repair=none", "finetune.steps=0",
                 "fusion.signs=true", "fusion.samples=16", "fusion.batch_size=8", "data.max_length=24", "data.max_train=40",
                 "data.max_eval=16", "eval_batch_size=16", "device=cpu", f"hydra.run.dir={out}",
                 f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf_gemma, read from their config.json)" in proc.stderr
    fused = hf_gemma.load(str(out / "fused"))
    assert type(fused) is type(model) and hf_gemma.tokenizer_of(fused).get_vocab() == tokenizer.get_vocab()
    mine = dict(model.named_parameters())
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[name], atol=1e-5, rtol=0)
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(fused, {"input_ids": ids}), outputs(model, {"input_ids": ids}), atol=1e-5, rtol=0)
    assert json.loads((out / "results.json").read_text())["one_shot"]["ot"]["loss"] > 0


@pytest.mark.parametrize("variant, cls", [("gemma3", Gemma3ForCausalLM), ("gemma2", Gemma2ForCausalLM), ("gemma4", None)])
def test_recipe_parents_are_built_from_the_config_group(variant, cls):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/model/hf_gemma.yaml")
    cfg.merge_with({"variant": variant, "hidden_size": 32, "mlp_size": 48})
    task = SimpleNamespace(tokenizer=train_bpe(["a few words of text " * 20], 80), max_length=16)
    if cls is None:
        with pytest.raises(TfuseError, match="model.variant='gemma4' is not known; allowed: gemma2, gemma3"):
            hf_gemma.build(cfg, task)
        return
    model = hf_gemma.build(cfg, task)
    assert type(model) is cls and model.config.vocab_size == len(task.tokenizer) and model.config.head_dim == 8
    assert hf_gemma.tokenizer_of(model) is task.tokenizer and hf_gemma.widened(model, 64).config.intermediate_size == 64


def test_the_family_is_detected_and_a_foreign_checkpoint_refused_in_one_line(tmp_path: Path):
    from tfuse.families import family_of

    for kind in ("gemma", "gemma2", "gemma3_text"):
        assert family_of({"model_type": kind}, "x") == "hf_gemma"
    for name, kind, cls in (("llama", "llama", "LlamaForCausalLM"), ("vlm", "gemma3", "Gemma3ForConditionalGeneration")):
        (tmp_path / name).mkdir()  # the multimodal Gemma 3 is another model
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": kind, "architectures": [cls]}))
        with pytest.raises(TfuseError, match=f"holds a {cls} \\('{kind}'\\) checkpoint, which model.family=hf_gemma") as err:
            hf_gemma.load(str(tmp_path / name))
        assert "\n" not in str(err.value)
