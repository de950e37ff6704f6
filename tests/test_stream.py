"""fusion.stream: parents read part by part from their checkpoints give the whole-model fuse's
maps and weights, from one file or shards; the budget decides where block-boundary states live;
bad checkpoints and full disks end in one line."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
    ViTForImageClassification,
)

from tfuse.arch import family
from tfuse.arch.lazy import lazy_parent
from tfuse.errors import TfuseError
from tfuse.fusion import boundary
from tfuse.fusion.boundary import BoundaryCache
from tfuse.fusion.compact import HardMap, compact
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.stream import stream_fuse
from tfuse.symmetry import symmetric_copy

VOCAB = 97
BUILDERS = {
    "hf_gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                  bos_token_id=0, eos_token_id=0)),
    "hf_llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     tie_word_embeddings=False, attention_bias=True)),
    "hf_bert": lambda: BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=48)),
    "hf_vit": lambda: ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=48, image_size=8, patch_size=2,
                                                          num_channels=1, num_labels=3)),
}
RESIDUALS = ("global", "mean", "weighted_scalar", "weighted_matrix", "no_resid", "only_resid")


def off_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm gains and biases moved off 1 and 0, so that a wrong map on them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def batches(fam: str, n: int = 3, size: int = 4):
    gen = torch.Generator().manual_seed(7)
    if fam == "hf_vit":
        data = [{"pixel_values": torch.randn(size, 1, 8, 8, generator=gen)} for _ in range(n)]
    else:
        mask = torch.ones(size, 10, dtype=torch.long)
        mask[1, 7:] = 0  # padding never counts
        data = [{"input_ids": torch.randint(1, VOCAB, (size, 10), generator=gen), "attention_mask": mask} for _ in range(n)]
    return lambda: iter(data)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family, three parents saved: parent 1 in shards."""
    out = {}
    for fam, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(fam)
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(off_init(build(), seed))
            models[-1].save_pretrained(folder / f"p{seed}", max_shard_size="20KB" if seed == 1 else "1GB")
        out[fam] = (models, [str(folder / f"p{seed}") for seed in range(3)])
    return out


def outputs(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def lazies(dirs, fam, **kw):
    return [lazy_parent(d, fam, f"parents[{i}]", **kw) for i, d in enumerate(dirs)]


def settings(fam: str, residual: str) -> OTSettings:
    signs = fam == "hf_llama" and residual == "global"
    return OTSettings(tokens="all", solver="emd", residual=residual, signs=signs,
                      qk="head_aware" if fam == "hf_llama" else "separate", samples=12, batch_size=4)


@pytest.mark.parametrize("fam", list(BUILDERS))
@pytest.mark.parametrize("residual", RESIDUALS)
def test_streamed_equals_whole_for_three_parents(saved, fam, residual):
    models, dirs = saved[fam]
    assert len(list(Path(dirs[1]).glob("*.safetensors"))) >= 2  # parent 1 is read from shards
    st, graph = settings(fam, residual), family(fam).graph
    whole = ot_fuse(models, graph(models[0]), st, 1, batches(fam), lambda x: x)
    parents = lazies(dirs, fam)
    streamed = stream_fuse(parents, graph(parents[0].model), st, 1, batches(fam), lambda x: x, memory_bytes=0)
    for i in (0, 2):
        assert set(whole.maps[i]) == set(streamed.maps[i])
        for space, t in whole.maps[i].items():
            torch.testing.assert_close(streamed.maps[i][space], t.double(), atol=1e-6, rtol=0)
    fused = dict(streamed.model.named_parameters())
    for name, w in whole.model.named_parameters():
        torch.testing.assert_close(fused[name], w, atol=1e-6, rtol=1e-5)


def test_a_signed_permuted_copy_is_recovered_exactly_from_shards(tmp_path):
    torch.manual_seed(0)
    a = off_init(BUILDERS["hf_llama"](), 0)
    graph = family("hf_llama").graph
    b = symmetric_copy(a, graph(a), seed=3, signs=True)
    a.save_pretrained(tmp_path / "a", max_shard_size="30KB")
    b.save_pretrained(tmp_path / "b", max_shard_size="30KB")
    parents = lazies([tmp_path / "a", tmp_path / "b"], "hf_llama")
    out = stream_fuse(parents, graph(parents[0].model), settings("hf_llama", "global"), 0, batches("hf_llama"),
                      lambda x: x)
    assert all(isinstance(m, HardMap) for m in out.maps[1].raw.values())  # kept as indices and signs
    assert out.info["sign_flips"][0]["stream"][0] > 0
    x = batches("hf_llama")()
    with torch.no_grad():
        for batch in x:
            torch.testing.assert_close(out.model(**batch).logits, a(**batch).logits, atol=1e-5, rtol=1e-5)


def test_sharded_and_single_file_parents_fuse_alike_and_the_fused_model_reloads_from_shards(saved, tmp_path):
    models, dirs = saved["hf_gpt2"]
    models[1].save_pretrained(tmp_path / "whole")  # parent 1 again, in one file
    st, graph = settings("hf_gpt2", "mean"), family("hf_gpt2").graph
    one = lazies([dirs[0], tmp_path / "whole"], "hf_gpt2")
    two = lazies(dirs[:2], "hf_gpt2")
    a = stream_fuse(one, graph(one[0].model), st, 0, batches("hf_gpt2"), lambda x: x).model
    b = stream_fuse(two, graph(two[0].model), st, 0, batches("hf_gpt2"), lambda x: x).model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    a.save_pretrained(tmp_path / "fused", max_shard_size="20KB")
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        for batch in batches("hf_gpt2")():
            assert torch.equal(again(**batch).logits, a(**batch).logits)


def test_bf16_parents_stream_into_a_bf16_model(saved, tmp_path):
    models, _ = saved["hf_llama"]
    for i in range(2):
        copy.deepcopy(models[i]).to(torch.bfloat16).save_pretrained(tmp_path / f"p{i}")
    parents = lazies([tmp_path / "p0", tmp_path / "p1"], "hf_llama")
    out = stream_fuse(parents, family("hf_llama").graph(parents[0].model), settings("hf_llama", "global"), 0,
                      batches("hf_llama"), lambda x: x)
    assert {p.dtype for p in out.model.parameters()} == {torch.bfloat16}


def test_the_budget_decides_where_boundary_states_live(monkeypatch):
    x = torch.ones(4, 8)  # 128 bytes
    cache = BoundaryCache(torch.device("cpu"), budget=200)
    cache.put("a", x)
    cache.put("b", x)  # over the budget: on disk
    assert (cache.where("a"), cache.where("b")) == ("device", "disk")
    assert torch.equal(cache.get("b"), x)
    cache.put("a", 2 * x)  # replacing frees its room
    assert cache.where("a") == "device" and torch.equal(cache.get("a"), 2 * x)
    cache.close()
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # a "device" that is not the host
    gpu = BoundaryCache(torch.device("meta"), budget=130, host_budget=130)
    for key in "abc":
        gpu.put(key, x)
    assert [gpu.where(k) for k in "abc"] == ["device", "host", "disk"]
    gpu.close()


def test_a_full_disk_is_one_line_and_leaves_no_file(monkeypatch, tmp_path):
    cache = BoundaryCache(torch.device("cpu"), budget=0, folder=str(tmp_path))
    monkeypatch.setattr(boundary.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(TfuseError, match=r"disk is full: 128 bytes are needed .* 10 are free"):
        cache.put("a", torch.ones(4, 8))
    monkeypatch.undo()

    def fails_midway(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(boundary, "save_file", fails_midway)
    with pytest.raises(TfuseError, match="disk is full"):
        cache.put("b", torch.ones(4, 8))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    cache.close()


def test_bad_checkpoints_are_one_line(saved, tmp_path):
    models, dirs = saved["hf_gpt2"]
    with pytest.raises(TfuseError, match="model.family=hf_vit does not own"):
        lazy_parent(dirs[0], "hf_vit", "parents[0]")
    state = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    models[0].config.save_pretrained(tmp_path / "missing")
    save_file({n: t for n, t in state.items() if n != "transformer.h.1.mlp.c_fc.weight"},
              tmp_path / "missing" / "model.safetensors")
    with pytest.raises(TfuseError, match="tensor 'transformer.h.1.mlp.c_fc.weight' of the model is missing"):
        lazy_parent(tmp_path / "missing", "hf_gpt2", "parents[0]")
    models[0].config.save_pretrained(tmp_path / "extra")
    save_file({**state, "transformer.h.9.extra": torch.zeros(2)}, tmp_path / "extra" / "model.safetensors")
    with pytest.raises(TfuseError, match="tensor 'transformer.h.9.extra' of the checkpoint .* is not a parameter"):
        lazy_parent(tmp_path / "extra", "hf_gpt2", "parents[0]")
    with pytest.raises(TfuseError, match="not one"):
        lazy_parent(tmp_path / "absent", "hf_gpt2", "parents[0]")


def test_compact_keeps_only_signed_permutations_hard():
    perm, sign = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    t = torch.zeros(3, 3, dtype=torch.float64)
    t[perm, torch.arange(3)] = sign / 3
    hard = compact(t)
    assert isinstance(hard, HardMap) and torch.equal(hard.dense(), t)
    w = torch.randn(3, 5)
    assert torch.allclose(hard.gather(w, 0), 3 * t.T.float() @ w)
    assert torch.allclose(hard.gather(w.T, 1), w.T @ (3 * t.float()))
    soft = compact(torch.full((3, 3), 1 / 9, dtype=torch.float64))
    assert not isinstance(soft, HardMap) and soft.dtype == torch.float32


def whole_and_streamed(saved, fam: str, st, **kw):
    """The same fusion of ``fam``'s three parents on eight batches, of whole models and streamed."""
    models, dirs = saved[fam]
    graph = family(fam).graph
    whole = ot_fuse(models, graph(models[0]), st, 1, batches(fam, n=8), lambda x: x, **kw)
    parents = lazies(dirs, fam)
    streamed = stream_fuse(parents, graph(parents[0].model), st, 1, batches(fam, n=8), lambda x: x, memory_bytes=0, **kw)
    return whole, streamed


@pytest.mark.parametrize("solver", ["cheaper", "cross_grams"])
@pytest.mark.parametrize("fam", list(BUILDERS))
def test_the_streamed_repair_equals_the_stored_target_repair(monkeypatch, saved, fam, solver):
    """Three parents, an untied head for LLaMA, more samples than any layer's inputs: the same
    fits, weights and outputs as the whole-model repair, which stores its targets; with each
    stage's cheaper solver (targets formed batch by batch, or cross-Grams) and with cross-Grams
    for every stage."""
    from tfuse.fusion import blockwise, crossgram

    if solver == "cross_grams":
        monkeypatch.setattr(blockwise, "for_stage", lambda layers, ridge, targets, weights: crossgram.CrossGram(
            layers, ridge, targets, weights))
    st = dataclasses.replace(settings(fam, "global"), repair="lstsq", repair_samples=32)
    whole, streamed = whole_and_streamed(saved, fam, st)
    fits = {f.layer: [f.before, f.after] for f in whole.repair}
    got = {f.layer: [f.before, f.after] for f in streamed.repair}
    assert set(got) == set(fits) and ("lm_head" in fits) == (fam == "hf_llama")
    for layer, pair in fits.items():
        assert got[layer] == pytest.approx(pair, abs=1e-6), layer
    fused = dict(streamed.model.named_parameters())
    for name, w in whole.model.named_parameters():  # float32 sums in another order: ill-determined directions move
        torch.testing.assert_close(fused[name], w, atol=2e-2 * float(w.abs().max()), rtol=2e-2)
    with torch.no_grad():
        for batch in batches(fam)():
            want = outputs(whole.model, batch)
            torch.testing.assert_close(outputs(streamed.model, batch), want, atol=1e-4 * float(want.abs().max()), rtol=0)


def competence(model, batch):
    """A stand-in for a task's per-sample scores: each example's mean probability of class 0 and
    its mean top probability (over its tokens), which differ from parent to parent."""
    probs = torch.softmax(outputs(model, batch).float(), dim=-1)
    reduce = (lambda v: v.mean(1)) if probs.dim() == 3 else (lambda v: v)
    return reduce(probs[..., 0]), reduce(probs.max(-1).values)


@pytest.mark.parametrize("solver", ["cheaper", "cross_grams"])
@pytest.mark.parametrize("fam", ["hf_vit", "hf_llama"])
def test_per_sample_targets_stream_as_in_the_stored_target_repair(monkeypatch, saved, fam, solver):
    """``repair_targets=label`` (``X^T D_k X_k``): each aligned parent, scored whole with one block
    resident, weighs its samples as in the whole-model repair; the same fits and outputs."""
    from tfuse.fusion import blockwise, crossgram

    if solver == "cross_grams":
        monkeypatch.setattr(blockwise, "for_stage", lambda layers, ridge, targets, weights: crossgram.CrossGram(
            layers, ridge, targets, weights))
    models, _ = saved[fam]
    st = dataclasses.replace(settings(fam, "global"), repair="lstsq", repair_samples=32, repair_targets="label")
    whole, streamed = whole_and_streamed(saved, fam, st, competence=competence)
    plain = ot_fuse(models, family(fam).graph(models[0]), dataclasses.replace(st, repair_targets="mean"), 1,
                    batches(fam, n=8), lambda x: x)
    fits = {f.layer: [f.before, f.after] for f in whole.repair}
    assert max(abs(f.before - fits[f.layer][0]) for f in plain.repair) > 1e-4  # the per-sample weights matter here
    got = {f.layer: [f.before, f.after] for f in streamed.repair}
    assert set(got) == set(fits)
    for layer, pair in fits.items():
        assert got[layer] == pytest.approx(pair, abs=1e-6), layer
    with torch.no_grad():
        for batch in batches(fam)():
            want = outputs(whole.model, batch)
            torch.testing.assert_close(outputs(streamed.model, batch), want, atol=1e-4 * float(want.abs().max()), rtol=0)
    assert all(not p.is_meta for p in streamed.model.parameters())


@pytest.mark.parametrize("fam", ["hf_gpt2", "hf_llama"])
def test_the_streamed_rescale_equals_the_whole_model_rescale(saved, fam):
    st = dataclasses.replace(settings(fam, "global"), repair="rescale", repair_samples=32)
    whole, streamed = whole_and_streamed(saved, fam, st)
    fused = dict(streamed.model.named_parameters())
    for name, w in whole.model.named_parameters():
        torch.testing.assert_close(fused[name], w, atol=1e-4 * float(w.abs().max()), rtol=1e-4)


def test_a_head_is_solved_in_row_chunks(monkeypatch, saved):
    from tfuse.fusion import crossgram

    models, dirs = saved["hf_llama"]
    st = dataclasses.replace(settings("hf_llama", "global"), repair="lstsq", repair_samples=32)
    graph = family("hf_llama").graph
    whole = stream_fuse(lazies(dirs, "hf_llama"), graph(models[0]), st, 0, batches("hf_llama", n=8), lambda x: x)
    monkeypatch.setattr(crossgram, "CHUNK_ROWS", 40)  # the head's 97 rows in three chunks
    chunked = stream_fuse(lazies(dirs, "hf_llama"), graph(models[0]), st, 0, batches("hf_llama", n=8), lambda x: x)
    assert [f.layer for f in chunked.repair if f.layer.startswith("lm_head")] == [
        "lm_head[0:40]", "lm_head[40:80]", "lm_head[80:97]"]
    torch.testing.assert_close(chunked.model.lm_head.weight, whole.model.lm_head.weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32),
    LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False),
    LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
])
def test_the_estimate_counts_the_weights_it_streams(config):
    """The shape-only estimate's parameters per block and outside the blocks are the model's."""
    from tfuse.estimate import DecoderShape, stream_bytes

    model = (GPT2LMHeadModel if isinstance(config, GPT2Config) else LlamaForCausalLM)(config)
    shape = DecoderShape.from_config(config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    first = sum(p.numel() for n, p in model.named_parameters() if ".0." in n and ("layers" in n or ".h." in n))
    assert shape.layer_parameters() == first
    small, spilled = stream_bytes(shape, repair=True), stream_bytes(shape, repair=True, budget=0)
    assert spilled["hidden_states_held"] == 0 and spilled["spill"] > 0 and spilled["total"] <= small["total"]
