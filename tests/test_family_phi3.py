"""Phi-3 (``hf_phi3``): LLaMA's layout with fused ``qkv_proj`` (unequal parts under GQA) and
``gate_up_proj``. The self-test passes with and without GQA, tied or not, under partial RoPE; the
views are the slices the modeling code takes; claims the model lacks fail; a transformed
(sign-flipped) copy fuses back into the original, through repairs, widths and the CLI from
checkpoint directories without ``model=``; a foreign checkpoint is refused in one line."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

from conftest import tfuse
from tfuse.arch import check_same_architecture, family, hf_phi3
from tfuse.arch.lazy import lazy_parent
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.families import family_of
from tfuse.fusion.engine import parameters
from tfuse.fusion.graph import Out
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.stream import stream_fuse
from tfuse.selftest import example_inputs, off_init, outputs, self_test
from tfuse.symmetry import symmetric_copy, widened_copy


def phi3(kv=2, seed=0, hidden=32, mlp=48, vocab=61, **extra) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(hf_phi3.config(hidden, mlp, 2, 4, kv, vocab, head_dim=8, bos_token_id=0, eos_token_id=0,
                                          pad_token_id=None, **extra)).eval()


VARIANTS = {
    "tiny": hf_phi3.tiny,
    "mha": lambda: phi3(kv=4),
    "mqa": lambda: phi3(kv=1),
    "tied": lambda: phi3(tie_word_embeddings=True),
    "partial_rope": lambda: phi3(partial_rotary_factor=0.5),
}
BATCHES = example_inputs(hf_phi3.tiny(), batches=2, size=4)


def logits(model, batches=BATCHES) -> torch.Tensor:
    return torch.cat([outputs(model, b) for b in batches])


def fuse(models, graph, anchor=0, **knobs):
    settings = OTSettings(**{**dict(solver="emd", qk="head_aware", residual="global", tokens="all", samples=8,
                                    batch_size=4, signs=True), **knobs})
    return ot_fuse(models, graph, settings, anchor, lambda: iter(BATCHES), lambda b: b)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_passes_the_self_test(name):
    checks = self_test(VARIANTS[name](), hf_phi3.graph)
    assert all(c.passed for c in checks) and len(checks) == 7, [c for c in checks if not c.passed]


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_the_views_are_the_slices_the_modeling_code_takes(kv):
    """q, k, v: ``heads``, ``kv_heads``, ``kv_heads`` heads of rows; gate before up; each probe
    observes its own slice of ``qkv_proj``'s output, the virtual weights' image of its input."""
    model = phi3(kv=kv)
    graph = hf_phi3.graph(model)
    state = parameters(model, graph)
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    assert [state[f"{attn}.{p}.weight"].shape[0] for p in ("q_proj", "k_proj", "v_proj")] == [32, 8 * kv, 8 * kv]
    real = dict(model.named_parameters())
    assert all(torch.equal(w, real[n]) for n, w in graph.to_real(state).items())
    x = torch.randn(3, 5, 32)
    seen = model.model.layers[0].self_attn.qkv_proj(x)
    for space, proj in zip(("layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"), ("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(graph.probes[space].select(seen), x @ state[f"{attn}.{proj}.weight"].T)
    up, gate = x @ state[f"{mlp}.up_proj.weight"].T, x @ state[f"{mlp}.gate_proj.weight"].T
    with torch.no_grad():
        want = (up * torch.nn.functional.silu(gate)) @ real[f"{mlp}.down_proj.weight"].T
        torch.testing.assert_close(model.model.layers[0].mlp(x), want)


def _gate_signed(graph):
    params = {n: (Out(a[0].space),) + a[1:] if n.endswith("gate_proj.weight") else a for n, a in graph.params.items()}
    return dataclasses.replace(graph, params=params)


def _qk_free(graph):
    return dataclasses.replace(graph, attention=[dataclasses.replace(a, rope=False) for a in graph.attention])


@pytest.mark.parametrize("wrong", [_gate_signed, _qk_free], ids=["gate_flips", "qk_dims_move"])
def test_a_claim_the_model_lacks_fails_the_self_test(wrong):
    """SiLU is not odd (a gate row keeps its sign); RoPE pins Q/K dimensions inside a head."""
    model = phi3(partial_rotary_factor=1.0)
    checks = {c.name: c for c in self_test(model, lambda m: wrong(hf_phi3.graph(m)))}
    assert not checks["a copy under the graph's symmetries computes the same outputs"].passed


def test_equal_parts_do_not_describe_qkv_under_gqa():
    model = phi3(kv=2)
    graph = hf_phi3.graph(model)
    views = {n: dataclasses.replace(v, shares=None) if n.endswith("qkv_proj.weight") else v for n, v in graph.views.items()}
    with pytest.raises(TfuseError, match="qkv_proj.weight' axis 0 \\(size 64\\) does not split"):
        parameters(model, dataclasses.replace(graph, views=views))


def test_a_signed_copy_flips_up_rows_but_never_gate_rows():
    """Hidden unit j of the copy is the original's unit p(j) with its up row (and down column) times
    s(j), its gate row not: the per-unit product gate . up changes sign exactly where s(j) = -1 (the
    stream's own permutation and signs cancel in it); the logits stay."""
    model = hf_phi3.tiny()
    graph = hf_phi3.graph(model)
    twin = symmetric_copy(model, graph, seed=3, signs=True)
    torch.testing.assert_close(logits(twin), logits(model), atol=1e-5, rtol=1e-4)
    a, b = parameters(model, graph), parameters(twin, graph)
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    key = lambda w: w.abs().sort(dim=1).values  # noqa: E731  (a row's magnitudes: blind to the stream's map)
    p = torch.cdist(key(b[gate]), key(a[gate])).argmin(1)
    assert sorted(p.tolist()) == list(range(48))
    before, after = (a[gate] * a[up]).sum(1)[p], (b[gate] * b[up]).sum(1)
    torch.testing.assert_close(after.abs(), before.abs())
    assert (after * before < 0).any() and (after * before > 0).any()


def test_three_parents_and_repairs_recover_the_model():
    model = off_init(hf_phi3.tiny(), 0)
    graph = hf_phi3.graph(model)
    copies = [symmetric_copy(model, graph, seed=s, signs=True) for s in (1, 2)]
    for repair in ("lstsq", "rescale"):
        fused = fuse([copies[0], model, copies[1]], graph, anchor=1, repair=repair).model
        torch.testing.assert_close(logits(fused), logits(model), atol=1e-4, rtol=1e-4)


def test_a_widened_copy_fuses_back_into_the_original_widths():
    """Every MLP unit and stream coordinate duplicated (heads keep their width): the qkv view splits
    the wider parent in the same proportions."""
    model, wide = phi3(), phi3(hidden=64, mlp=96)
    graph = hf_phi3.graph(model)
    spaces = [s for s in graph.spaces() if s.endswith(".mlp")] + [graph.stream]
    widened = widened_copy(model, graph, wide, spaces)
    torch.testing.assert_close(logits(widened), logits(model), atol=1e-5, rtol=1e-4)
    fused = fuse([widened, model], graph, anchor=1).model
    torch.testing.assert_close(logits(fused), logits(model), atol=1e-5, rtol=1e-4)


def test_build_reads_the_model_config_group_and_parents_with_other_heads_are_refused():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "hf_phi3.yaml")
    cfg.merge_with({"hidden_size": 32, "mlp_size": 48, "partial_rotary_factor": 0.5})
    task = type("Task", (), {"tokenizer": train_bpe(["a small corpus " * 20], 80), "max_length": 16})()
    model = family(cfg.family).build(cfg, task)
    assert isinstance(model, Phi3ForCausalLM) and model.config.vocab_size == len(task.tokenizer)
    assert model.config.head_dim == 8 and model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert "lm_head.weight" in dict(model.named_parameters())  # untied, as Phi-3's
    cfg.merge_with({"hidden_size": 64})  # head_dim 16: RoPE gives its Q/K dimensions other meanings
    with pytest.raises(TfuseError, match="different head dimensions under RoPE"):
        check_same_architecture([model, family(cfg.family).build(cfg, task)], allow_widths=True)


# ---------------------------------------------------------------- from checkpoint directories


@pytest.mark.parametrize("repair", ["none", "lstsq"])
def test_streamed_from_shards_equals_the_whole_model_fuse_and_recovers_the_model(repair, tmp_path: Path):
    """Parents read block by block (fused qkv_proj / gate_up_proj split part by part), repaired or not."""
    model = off_init(hf_phi3.tiny(), 0)
    twin = symmetric_copy(model, hf_phi3.graph(model), seed=2, signs=True)
    for name, m in (("a", model), ("b", twin)):
        m.save_pretrained(tmp_path / name, max_shard_size="30KB")
    parents = [lazy_parent(str(tmp_path / n), "hf_phi3", f"parents[{i}]") for i, n in enumerate("ab")]
    assert len(list((tmp_path / "b").glob("*.safetensors"))) >= 2
    settings = OTSettings(solver="emd", qk="head_aware", residual="global", tokens="all", samples=8, batch_size=4,
                          signs=True, repair=repair)
    streamed = stream_fuse(parents, hf_phi3.graph(parents[0].model), settings, 0, lambda: iter(BATCHES), lambda b: b,
                           memory_bytes=0).model
    torch.testing.assert_close(logits(streamed), logits(model), atol=1e-4, rtol=1e-4)
    if repair == "none":  # a refit moves ill-determined directions by float32 noise, which differs between the two
        whole, fused = fuse([model, twin], hf_phi3.graph(model)).model, dict(streamed.named_parameters())
        for name, w in whole.named_parameters():
            torch.testing.assert_close(fused[name], w, atol=1e-6, rtol=1e-6)


def test_the_cli_fuses_a_signed_copy_back_without_model(tmp_path: Path):
    """``tfuse fuse parents=[A,B]``: the family comes from config.json, hard OT with signs undoes
    the copy, and the saved fused model is the original."""
    tokenizer = train_bpe(["To be, or not to be, that is the question of the plays " * 40], 120)
    model = hf_phi3.attach_tokenizer(off_init(phi3(vocab=len(tokenizer)), 0), tokenizer)
    twin = symmetric_copy(model, hf_phi3.graph(model), seed=1, signs=True)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    hf_phi3.save(model, str(a))
    hf_phi3.save(twin, str(b))
    proc = tfuse("fuse", f"parents=[{a},{b}]", "fusion.solver=emd", "fusion.signs=true", "fusion.repair=none",
                 "finetune.steps=0", "fusion.samples=16", "fusion.batch_size=8", "data.max_length=24",
                 "data.max_train=40", "data.max_eval=16", "eval_batch_size=16", "device=cpu", f"hydra.run.dir={out}",
                 f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf_phi3, read from their config.json)" in proc.stderr
    fused = hf_phi3.load(str(out / "fused"))
    assert type(fused) is Phi3ForCausalLM and hf_phi3.tokenizer_of(fused).get_vocab() == tokenizer.get_vocab()
    mine = dict(model.named_parameters())
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[name], atol=1e-5, rtol=0)
    ids = [{"input_ids": torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(4))}]
    torch.testing.assert_close(logits(fused, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    assert json.loads((out / "results.json").read_text())["one_shot"]["ot"]["loss"] > 0


def test_the_family_is_read_from_config_json_and_a_foreign_checkpoint_is_refused_in_one_line(tmp_path: Path):
    hf_phi3.tiny().save_pretrained(tmp_path / "phi3")
    assert family_of(json.loads((tmp_path / "phi3" / "config.json").read_text()), "parents[0]") == "hf_phi3"
    assert hf_phi3.owns(hf_phi3.load(str(tmp_path / "phi3")))
    LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(TfuseError, match="holds a LlamaForCausalLM \\('llama'\\) checkpoint, which model.family=hf_phi3 "
                                         "does not own") as err:
        hf_phi3.load(str(tmp_path / "llama"))
    assert "\n" not in str(err.value)
    from tfuse.arch import hf_llama

    with pytest.raises(TfuseError, match="holds a Phi3ForCausalLM \\('phi3'\\) checkpoint, which model.family=hf_llama"):
        hf_llama.load(str(tmp_path / "phi3"))


def test_partial_rope_pins_only_the_rotated_qk_dimensions():
    """Phi-4-mini-style partial RoPE: the graph pins the rotated half of each head's Q/K dimensions
    and lets the rest move (the self-test's copy moves them); claiming every one free fails."""
    model = phi3(partial_rotary_factor=0.5)
    head_dim = model.config.head_dim
    assert {a.rotary for a in hf_phi3.graph(model).attention} == {head_dim // 2}
    assert all(c.passed for c in self_test(model, hf_phi3.graph))
    free = lambda m: dataclasses.replace(  # noqa: E731
        hf_phi3.graph(m), attention=[dataclasses.replace(a, rotary=0) for a in hf_phi3.graph(m).attention])
    checks = {c.name: c for c in self_test(model, free)}
    assert not checks["a copy under the graph's symmetries computes the same outputs"].passed
