"""GPT-NeoX (Pythia): every symmetry the flow graph claims keeps the logits (the centred stream,
whole heads with their first rotary_ndims Q/K dimensions pinned and the others free, jointly in Q
and K, value dimensions, GELU units), for parallel and serial blocks; the per-head interleaved
query_key_value splits exactly; claims it does not make break the model; two different parents
fuse and repair; a transformed copy fuses back into the original through the CLI, the family read
from config.json; a foreign checkpoint is refused in one line."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import fuse_in_process, tfuse
from tfuse.arch import check_same_architecture, family, hf_gptneox
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.families import family_of
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods import METHODS, Calibration
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.selftest import example_inputs, off_init, outputs, self_test
from tfuse.symmetry import symmetric_copy, widened_copy

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
HEADS, HEAD_DIM = 4, 8


def neox(seed: int = 0, **change) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**SIZES, "rotary_pct": 0.5, **change})).eval()


MODELS = {
    "tiny": hf_gptneox.tiny,  # parallel, half of each head's Q/K under RoPE, untied
    "serial": lambda: neox(use_parallel_residual=False),
    "pythia_rotary_quarter": lambda: neox(rotary_pct=0.25),
    "full_rotary_serial": lambda: neox(rotary_pct=1.0, use_parallel_residual=False),
    "no_bias_tied": lambda: neox(attention_bias=False, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_variant_passes_the_self_test_with_rotations(name):
    model = MODELS[name]()
    graph = hf_gptneox.graph(model)
    assert hf_gptneox.owns(model) and not graph.signed and graph.rotations == "centred"
    checks = self_test(model, hf_gptneox.graph)
    assert [c.name for c in checks][-1] == "fusion.maps=orthogonal recovers it"
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_the_interleaved_query_key_value_splits_into_the_heads_q_k_and_v_and_back():
    model = neox()
    graph = hf_gptneox.graph(model)
    attn = "gpt_neox.layers.0.attention"
    real = dict(model.named_parameters())[f"{attn}.query_key_value.weight"].detach()
    virtual = parameters(model, graph)
    per_head = real.view(HEADS, 3, HEAD_DIM, -1)  # how the model reads it: (heads, [q; k; v], head_dim)
    for i, part in enumerate("qkv"):
        assert torch.equal(virtual[f"{attn}.{part}.weight"], per_head[:, i].reshape(HEADS * HEAD_DIM, -1))
    assert torch.equal(graph.to_real(virtual)[f"{attn}.query_key_value.weight"], real)
    x = torch.randn(2, 5, 96)  # a probe sees the same rows of the module's output
    fused_out = x.view(2, 5, HEADS, 3, HEAD_DIM)
    for i, space in enumerate(("layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v")):
        assert torch.equal(graph.probes[space].select(x), fused_out[..., i, :].reshape(2, 5, 32))


def _queries(model) -> torch.Tensor:
    """Layer 0's query rows, (heads, head_dim, in), each sorted: the stream's permutation of the
    columns aside, a row is the same row."""
    q = parameters(model, hf_gptneox.graph(model))["gpt_neox.layers.0.attention.q.weight"]
    return q.sort(dim=1).values.view(HEADS, HEAD_DIM, -1)


@pytest.mark.parametrize("pct", [0.25, 0.5])
def test_the_copy_keeps_the_rotary_dimensions_in_place_and_moves_the_others(pct):
    model = neox(rotary_pct=pct)
    pinned = int(HEAD_DIM * pct)
    assert hf_gptneox.graph(model).attention[0].rotary == pinned
    twin = symmetric_copy(model, hf_gptneox.graph(model), seed=4)
    mine, theirs = _queries(model), _queries(twin)
    moved_free = False
    for head in theirs:
        source = next(h for h in mine if torch.equal(h[:pinned], head[:pinned]))  # a whole head, rotary rows in place
        order = [next(j for j in range(pinned, HEAD_DIM) if torch.equal(source[j], row)) for row in head[pinned:]]
        assert sorted(order) == list(range(pinned, HEAD_DIM))  # the free rows permuted inside their head
        moved_free |= order != list(range(pinned, HEAD_DIM))
    assert moved_free


def _copy_difference(model, graph, signs: bool = False) -> float:
    model = off_init(model, 0)
    twin = symmetric_copy(model, graph, seed=1, signs=signs)
    batch = example_inputs(model, batches=1)[0]
    want = outputs(model, batch)
    return float((outputs(twin, batch) - want).abs().max() / want.abs().max())


def _claiming(model, **change):
    """The family's graph of ``model`` with every attention block's fields changed."""
    graph = hf_gptneox.graph(model)
    return dataclasses.replace(graph, attention=[dataclasses.replace(att, **change) for att in graph.attention])


@pytest.mark.parametrize("parallel", [True, False])
def test_claims_the_model_does_not_make_change_the_outputs(parallel):
    """Freeing the rotary dimensions breaks the model; pinning every dimension (whole heads) is a
    smaller, still true claim; reading query_key_value as [q; k; v] blocks is wrong; so are sign
    flips of the GELU units or of the stream."""
    model = neox(use_parallel_residual=parallel, initializer_range=0.2)  # attention logits large enough to matter
    assert _copy_difference(model, hf_gptneox.graph(model)) < 1e-5
    assert _copy_difference(model, _claiming(model, rotary=None)) < 1e-5
    assert _copy_difference(model, _claiming(model, rotary=0)) > 1e-3
    graph = hf_gptneox.graph(model)
    blocks = {name: dataclasses.replace(view, groups=1) for name, view in graph.views.items()}
    assert _copy_difference(model, dataclasses.replace(graph, views=blocks)) > 1e-3
    mlp = {s for s in graph.spaces() if s.endswith(".mlp")}  # GELU is not odd; LayerNorm centres the stream
    assert _copy_difference(model, dataclasses.replace(graph, signed=mlp), signs=True) > 1e-3
    stream = set(graph.stream_points()) | {r.branch for r in graph.residuals}
    assert _copy_difference(model, dataclasses.replace(graph, signed=stream), signs=True) > 1e-3


def test_parallel_and_serial_blocks_are_different_functions_of_the_same_weights():
    """The two residual forms are both exercised above: their weights compute different logits."""
    batch = example_inputs(neox(), batches=1)[0]
    assert not torch.allclose(outputs(neox(), batch), outputs(neox(use_parallel_residual=False), batch), atol=1e-3)


IDS = torch.randint(0, 61, (8, 12), generator=torch.Generator().manual_seed(7))
BATCHES = [{"input_ids": IDS[i:i + 4]} for i in (0, 4)]


def _fuse(models, **knobs):
    settings = OTSettings(**{**dict(solver="emd", qk="head_aware", residual="global", tokens="all", samples=16,
                                    batch_size=4), **knobs})
    return ot_fuse(models, hf_gptneox.graph(models[0]), settings, 0, lambda: iter(BATCHES), lambda b: b)


def _kl(model, parents) -> float:
    """The mean KL divergence from each parent's next-token distribution to ``model``'s."""
    mine = torch.log_softmax(outputs(model, BATCHES[0]), -1)
    theirs = [torch.log_softmax(outputs(p, BATCHES[0]), -1) for p in parents]
    return sum(float((t.exp() * (t - mine)).sum(-1).mean()) for t in theirs) / len(theirs)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("residual", ["global", "mean"])
def test_two_different_parents_fuse_and_the_lstsq_repair_fits_every_layer(parallel, residual):
    """Under the exact (global) policy the aligned, repaired model predicts like its parents better
    than the aligned one alone, and that better than plain averaging; a combining policy plans and
    repairs the chained sums too."""
    a, b = (neox(seed, use_parallel_residual=parallel, initializer_range=0.2) for seed in (0, 1))
    outcome = _fuse([a, b], repair="lstsq", residual=residual)
    fits = outcome.repair
    assert {f.layer.rsplit(".", 1)[-1] for f in fits} >= {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert all(f.after <= f.before + 1e-9 for f in fits)
    assert torch.isfinite(outputs(outcome.model, BATCHES[0])).all()
    if residual == "global":
        plain = neox(use_parallel_residual=parallel)
        plain.load_state_dict({n: (w + b.state_dict()[n]) / 2 for n, w in a.state_dict().items()})
        aligned = _fuse([a, b], residual=residual).model
        assert _kl(outcome.model, [a, b]) < _kl(aligned, [a, b]) < _kl(plain, [a, b])


def test_soft_maps_keep_the_rotary_dimensions_in_place_and_spread_the_free_ones():
    """Under Sinkhorn, a Q/K map's block between two heads is a multiple of the identity on the
    rotary dimensions, with no mass between them and the free ones; the free ones may spread.
    Q and K share the map (one query head per key head)."""
    a, b = neox(0), neox(1)
    maps = _fuse([a, b], solver="sinkhorn", reg=0.5).maps[1]
    pinned = HEAD_DIM // 2
    torch.testing.assert_close(maps["layers.0.attn.q"], maps["layers.0.attn.k"], atol=0, rtol=0)
    for space in ("layers.0.attn.q", "layers.1.attn.k"):
        blocks = maps[space].reshape(HEADS, HEAD_DIM, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        rotary = blocks[..., :pinned, :pinned]
        assert float((rotary * (1 - torch.eye(pinned, dtype=rotary.dtype))).abs().max()) == 0.0
        assert float(rotary.diagonal(dim1=2, dim2=3).std(-1).max()) < 1e-12
        assert float(blocks[..., :pinned, pinned:].abs().max()) == float(blocks[..., pinned:, :pinned].abs().max()) == 0.0
        free = blocks[..., pinned:, pinned:]
        assert float((free * (1 - torch.eye(HEAD_DIM - pinned, dtype=free.dtype))).abs().max()) > 0  # soft: spread
        torch.testing.assert_close(free.sum((2, 3)) * pinned, rotary.sum((2, 3)) * (HEAD_DIM - pinned))  # one head map


@pytest.mark.parametrize("method, cost", [("weight_matching", None), ("ot", "weights")])
def test_matching_on_weights_recovers_a_transformed_copy(method, cost):
    """The grouped head rule on weight costs (weight matching's, OT's) pins the rotary dimensions
    and matches the free ones too."""
    model = off_init(neox(rotary_pct=0.25), 0)
    twin = symmetric_copy(model, hf_gptneox.graph(model), seed=3)
    cls = METHODS[method].settings_class
    knobs = dict(solver="emd", qk="head_aware", residual="global", tokens="all", samples=16, batch_size=4, cost=cost)
    settings = cls(method=method, **{k: v for k, v in knobs.items() if k in cls.known()})
    fused = METHODS[method].fuse([twin, model], hf_gptneox.graph(model), 1, Calibration(lambda: iter(BATCHES), lambda b: b),
                                 settings).model
    mine = dict(model.named_parameters())
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[name], atol=1e-6, rtol=0)


def test_a_widened_mlp_fuses_back_and_fusion_width_keeps_every_unit():
    """``widened`` sets intermediate_size: a copy with every GELU unit doubled (halved readers)
    fuses back into the original width, and fusion.width=2 keeps both parents' units whole."""
    model = neox()
    wide = hf_gptneox.widened(model, 96)
    assert wide.config.intermediate_size == 96 and type(wide) is type(model)
    graph = hf_gptneox.graph(model)
    doubled = widened_copy(model, graph, wide, [s for s in graph.spaces() if s.endswith(".mlp")])
    want = outputs(model, BATCHES[0])
    torch.testing.assert_close(outputs(doubled, BATCHES[0]), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(_fuse([model, doubled]).model, BATCHES[0]), want, atol=1e-5, rtol=0)
    twin = symmetric_copy(model, graph, seed=2)
    settings = OTSettings(solver="emd", qk="head_aware", residual="global", tokens="all", samples=16, batch_size=4,
                          width=2.0)
    both = METHODS["ot"].fuse([model, twin], graph, 0, Calibration(lambda: iter(BATCHES), lambda b: b), settings).model
    assert both.config.intermediate_size == 96
    torch.testing.assert_close(outputs(both, BATCHES[0]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, says", [
    ({"rotary_pct": 0.25}, "different RoPE settings"),
    ({"use_parallel_residual": False}, "different block forms"),
])
def test_parents_whose_weights_mean_different_things_are_refused(change, says):
    with pytest.raises(TfuseError, match=says):
        check_same_architecture([neox(), neox(**change)], allow_widths=True)


def test_build_reads_the_model_config_group():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "hf_gptneox.yaml")
    task = type("Task", (), {"tokenizer": train_bpe(["a small corpus " * 20], 80), "max_length": 16})()
    model = family(cfg.family).build(cfg, task)
    assert model.config.use_parallel_residual and hf_gptneox.graph(model).attention[0].rotary == 8  # 32 x 0.25


# ---------------------------------------------------------------- from checkpoint directories


SMALL = ("data=pydoc", "fusion.solver=emd", "fusion.repair=none", "finetune.steps=0", "fusion.samples=16",
         "fusion.batch_size=8", "data.max_length=24", "data.max_train=40", "data.max_eval=16", "eval_batch_size=16",
         "device=cpu")


@pytest.mark.parametrize("parallel", [True, False])
def test_the_cli_fuses_a_transformed_copy_back_into_the_original(parallel, tmp_path: Path):
    """Parallel blocks through the shell, the family read from config.json; serial ones in-process
    (the model config group named)."""
    tokenizer = train_bpe(["To be, or not to be, that is the question of the plays " * 40], 120)
    model = hf_gptneox.attach_tokenizer(off_init(neox(vocab_size=len(tokenizer), use_parallel_residual=parallel), 0),
                                        tokenizer)
    twin = symmetric_copy(model, hf_gptneox.graph(model), seed=1)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    hf_gptneox.save(model, str(a))
    hf_gptneox.save(twin, str(b))
    where = (f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}")
    if parallel:
        proc = tfuse("fuse", f"parents=[{a},{b}]", *SMALL, *where, f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "(hf_gptneox, read from their config.json)" in proc.stderr
    else:
        fuse_in_process(out, "+experiment=llama_plays", "model=hf_gptneox", f"parents=[{a},{b}]", *SMALL, *where)
    fused = hf_gptneox.load(str(out / "fused"))
    assert type(fused) is GPTNeoXForCausalLM and hf_gptneox.tokenizer_of(fused).get_vocab() == tokenizer.get_vocab()
    mine = dict(model.named_parameters())
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[name], atol=1e-5, rtol=0)


def test_the_family_is_read_from_config_json_and_a_foreign_checkpoint_is_refused_in_one_line(tmp_path: Path):
    neox().save_pretrained(tmp_path / "neox")
    assert family_of({"model_type": "gpt_neox"}, "parents[0]") == "hf_gptneox"
    assert hf_gptneox.owns(hf_gptneox.load(str(tmp_path / "neox")))
    GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TfuseError, match="holds a GPT2LMHeadModel \\('gpt2'\\) checkpoint, which model.family=hf_gptneox "
                                         "does not own") as err:
        hf_gptneox.load(str(tmp_path / "gpt2"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("residual", ["global", "mean"])
def test_streamed_from_shards_the_interleaved_parameters_fuse_and_repair_as_whole_models(residual, tmp_path: Path):
    """fusion.stream reads query_key_value from a checkpoint part by part: the same maps, lstsq fits
    and outputs as the whole-model fusion."""
    from tfuse.arch.lazy import lazy_parent
    from tfuse.fusion.stream import stream_fuse

    models = [off_init(neox(seed), seed) for seed in (0, 1)]
    for seed, m in enumerate(models):
        m.save_pretrained(tmp_path / f"p{seed}", max_shard_size="20KB" if seed else "1GB")
    settings = OTSettings(solver="emd", qk="head_aware", residual=residual, tokens="all", samples=8, batch_size=4,
                          repair="lstsq")
    whole = ot_fuse(models, hf_gptneox.graph(models[0]), settings, 0, lambda: iter(BATCHES), lambda b: b)
    parents = [lazy_parent(str(tmp_path / f"p{i}"), "hf_gptneox", f"parents[{i}]") for i in range(2)]
    streamed = stream_fuse(parents, hf_gptneox.graph(parents[0].model), settings, 0, lambda: iter(BATCHES), lambda b: b,
                           memory_bytes=0)
    for space, t in whole.maps[1].items():
        torch.testing.assert_close(streamed.maps[1][space], t.double(), atol=1e-6, rtol=0)
    fits = {f.layer: (f.before, f.after) for f in whole.repair}
    assert {f.layer: pytest.approx((f.before, f.after), abs=1e-5) for f in streamed.repair} == fits
    want = outputs(whole.model, BATCHES[0])
    torch.testing.assert_close(outputs(streamed.model, BATCHES[0]), want, atol=1e-4 * float(want.abs().max()), rtol=0)
