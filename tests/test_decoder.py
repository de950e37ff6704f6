"""Decoder-only LMs (GPT-2, LLaMA/Mistral/Qwen2): the symmetries their flow graphs claim keep the
logits, hard OT recovers a model from a transformed copy of it, every method runs on both, and
bad parents get one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from conftest import fuse_in_process, tfuse
from tfuse.arch import check_heads, hf_gpt2, hf_llama
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.fusion.methods import METHODS, Calibration
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.symmetry import symmetric_copy, widened_copy

VOCAB = 50


def llama(tie=True, kv=2, head_dim=8, seed=0, mlp=48, hidden=32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )).eval()


def qwen2(seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
    )).eval()


def gpt2(tie=True, seed=0, mlp=None) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=mlp, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0,
    )).eval()


MODELS = {
    "gpt2_tied": (gpt2, hf_gpt2),
    "gpt2_untied": (lambda: gpt2(tie=False), hf_gpt2),
    "llama_gqa_tied": (llama, hf_llama),
    "llama_gqa_untied": (lambda: llama(tie=False), hf_llama),
    "llama_mha_head_dim": (lambda: llama(kv=4, head_dim=12), hf_llama),
    "qwen2_qkv_bias": (qwen2, hf_llama),
}
IDS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
BATCHES = [{"input_ids": IDS[i:i + 4], "attention_mask": torch.ones(4, 16, dtype=torch.long)} for i in (0, 4)]


def calibration() -> Calibration:
    source = lambda: iter(BATCHES)  # noqa: E731
    return Calibration(source, lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                       len(BATCHES), source)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


HARD = dict(solver="emd", qk="head_aware", residual="global", tokens="all", samples=8, batch_size=4)


def fuse(models, fam, method="ot", anchor=0, **knobs):
    cls = METHODS[method].settings_class
    settings = cls(method=method, **{k: v for k, v in {**HARD, **knobs}.items() if k in cls.known()})
    return METHODS[method].fuse(models, fam.graph(models[anchor]), anchor, calibration(), settings)


@pytest.mark.parametrize("name", MODELS)
def test_every_claimed_symmetry_keeps_the_logits(name):
    make, fam = MODELS[name]
    model = make()
    signs = fam is hf_llama
    copy = symmetric_copy(model, fam.graph(model), seed=3, signs=signs)
    assert relative(logits(model), logits(copy)) < 1e-5
    matrices = [(p, q) for p, q in zip(model.parameters(), copy.parameters()) if p.dim() == 2]
    assert all(not torch.equal(p, q) for p, q in matrices)  # the copy really moved every weight matrix


def test_rope_forbids_moving_dimensions_inside_a_head_and_silu_forbids_flipping_a_gate():
    """The controls of the symmetries: what the graph refuses to claim does change the function."""
    model = llama()
    moved = llama()
    with torch.no_grad():
        swap = torch.arange(8).roll(1)  # inside head 0 of Q and of K alike: a plain-attention symmetry
        for proj, heads in ((moved.model.layers[0].self_attn.q_proj, 4), (moved.model.layers[0].self_attn.k_proj, 2)):
            w = proj.weight.view(heads, 8, -1)
            w[:] = w[:, swap]
    assert relative(logits(model), logits(moved)) > 1e-3
    flipped = llama()
    with torch.no_grad():
        for p in (flipped.model.layers[0].mlp.gate_proj.weight, flipped.model.layers[0].mlp.up_proj.weight):
            p[:4] *= -1
        flipped.model.layers[0].mlp.down_proj.weight[:, :4] *= -1
    assert relative(logits(model), logits(flipped)) > 1e-3


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cost", ["activations", "weights"])
def test_hard_ot_recovers_a_transformed_copy(name, cost):
    make, fam = MODELS[name]
    model = make()
    signs = fam is hf_llama
    copy = symmetric_copy(model, fam.graph(model), seed=5, signs=signs)
    fused = fuse([copy, model], fam, anchor=1, cost=cost, signs=signs).model
    assert relative(logits(model), logits(fused)) < 1e-5


def test_without_signs_a_sign_flipped_copy_is_not_recovered_and_the_flips_are_counted():
    model = llama()
    copy = symmetric_copy(model, hf_llama.graph(model), seed=5, signs=True)
    plain = fuse([copy, model], hf_llama, anchor=1).model
    assert relative(logits(model), logits(plain)) > 1e-2
    outcome = fuse([copy, model], hf_llama, anchor=1, signs=True)
    flips = outcome.info["sign_flips"][0]
    assert 0 < flips["stream"][0] < flips["stream"][1] == 32  # about half the stream's coordinates
    assert all(0 < flips[f"layers.{k}.mlp"][0] < 48 for k in (0, 1))


@pytest.mark.parametrize("fam_name", ["gpt2", "llama"])
def test_three_parents_and_repairs_recover_the_model(fam_name):
    make, fam = (gpt2, hf_gpt2) if fam_name == "gpt2" else (llama, hf_llama)
    model = make()
    signs = fam is hf_llama
    copies = [symmetric_copy(model, fam.graph(model), seed=s, signs=signs) for s in (1, 2)]
    for repair in ("lstsq", "rescale"):
        fused = fuse([copies[0], model, copies[1]], fam, anchor=1, signs=signs, repair=repair).model
        assert relative(logits(model), logits(fused)) < 1e-5


@pytest.mark.parametrize("fam_name", ["gpt2", "llama"])
def test_widened_mlp_fuses_back_into_the_original_width(fam_name):
    """Every MLP neuron duplicated (and for LLaMA the stream too, its heads' width fixed)."""
    if fam_name == "gpt2":
        fam, model, wide = hf_gpt2, gpt2(mlp=128), gpt2(mlp=256)
    else:
        fam, model, wide = hf_llama, llama(tie=False), llama(tie=False, hidden=64, mlp=96)  # tied: the head would read copies
    graph = fam.graph(model)
    spaces = [s for s in graph.spaces() if s.endswith(".mlp")] + ([graph.stream] if fam is hf_llama else [])
    widened = widened_copy(model, graph, wide, spaces)
    assert relative(logits(model), logits(widened)) < 1e-5
    fused = fuse([widened, model], fam, anchor=1, signs=fam is hf_llama).model
    assert relative(logits(model), logits(fused)) < 1e-5


def test_soft_maps_move_rope_heads_whole():
    """Under Sinkhorn, every block of a RoPE query/key map between two heads is a multiple of the
    identity: mass moves between heads, never between dimensions."""
    a, b = llama(seed=0), llama(seed=1)
    outcome = fuse([a, b], hf_llama, solver="sinkhorn", reg=0.5, signs=True)
    for space in ("layers.0.attn.q", "layers.0.attn.k"):
        t = outcome.maps[1][space]
        blocks = t.reshape(t.shape[0] // 8, 8, t.shape[1] // 8, 8).permute(0, 2, 1, 3)
        off = blocks * (1 - torch.eye(8, dtype=t.dtype))
        assert float(off.abs().max()) == 0.0
        assert float(blocks.diagonal(dim1=2, dim2=3).std(-1).max()) < 1e-12
        assert (blocks.sum((2, 3)) > 0).sum() > t.shape[0] // 8  # soft: some head spreads over several
    assert torch.isfinite(logits(outcome.model)).all()


@pytest.mark.parametrize("method", ["vanilla", "weight_matching", "ot"])
@pytest.mark.parametrize("fam_name", ["gpt2", "llama"])
def test_every_method_fuses_both_families(method, fam_name):
    make, fam = (gpt2, hf_gpt2) if fam_name == "gpt2" else (llama, hf_llama)
    a, b = make(seed=0), make(seed=1)
    outcome = fuse([a, b], fam, method=method, repair="lstsq", solver="sinkhorn", signs=fam is hf_llama)
    fitted = outcome.repair
    assert fitted and all(f.after <= f.before + 1e-9 for f in fitted)
    assert torch.isfinite(logits(outcome.model)).all()


def test_qk_modes_that_split_heads_are_refused_under_rope():
    model = llama()
    with pytest.raises(TfuseError, match="fusion.qk=separate moves single dimensions.*RoPE.*head_aware"):
        ot_fuse([model, llama(seed=1)], hf_llama.graph(model), OTSettings(qk="separate"), 0, calibration().batches,
                calibration().model_inputs)


def test_a_head_count_the_anchor_cannot_map_is_refused():
    with pytest.raises(TfuseError, match="differ in attention 'layers.0.attn' \\(4 vs 4 query heads, 1 vs 2 key/value"):
        check_heads([llama(), llama(kv=1)])


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decoder_cli")


@pytest.fixture(scope="module")
def llama_run(workdir: Path) -> Path:
    out = workdir / "llama"
    proc = tfuse("fuse", "+experiment=llama_pydoc_tiny", "fusion.repair=lstsq", "finetune.steps=2",
                 f"hydra.run.dir={out}", f"cache_dir={workdir / 'parents'}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_llama_end_to_end_scores_continues_and_saves_a_loadable_model(llama_run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = json.loads((llama_run / "results.json").read_text())
    for name in ("parent_0", "parent_1", "ensemble", "vanilla", "ot"):
        scores = results["one_shot"][name]
        assert 0 < scores["loss"] < 7 and abs(scores["perplexity"] - torch.tensor(scores["loss"]).exp()) < 1e-3 * scores["perplexity"]
    assert results["one_shot"]["ensemble"]["loss"] <= max(results["one_shot"][f"parent_{i}"]["loss"] for i in (0, 1))
    texts = results["continuations"]
    assert texts["prompt"] and set(texts["one_shot"]) == {"parent_0", "parent_1", "vanilla", "ot"}
    assert all(isinstance(t, str) and t for t in texts["one_shot"].values()) and "ot" in texts["finetuned"]
    assert results["methods"]["ot"]["sign_flips"][0]["stream"][1] == 32
    model = AutoModelForCausalLM.from_pretrained(llama_run / "fused")
    tokenizer = AutoTokenizer.from_pretrained(llama_run / "fused")
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads == 2
    assert len(tokenizer) == model.config.vocab_size and (llama_run / "fused" / "README.md").exists()


def test_parents_from_directories_and_bad_parents(llama_run: Path, workdir: Path):
    parents = sorted((workdir / "parents").glob("hf_llama-*"))
    assert len(parents) == 2
    a, b = (p / "model" if (p / "model").is_dir() else p for p in parents)
    out = workdir / "given"  # in-process: the recipe run above came through the shell
    fuse_in_process(out, "+experiment=llama_pydoc_tiny", f"parents=[{a},{b}]", "finetune.steps=0",
                    f"statistics_dir={workdir / 'stats'}")
    given = json.loads((out / "results.json").read_text())["one_shot"]["ot"]["loss"]
    assert given == pytest.approx(json.loads((llama_run / "results.json").read_text())["one_shot"]["ot"]["loss"], rel=0.05)

    gpt2().save_pretrained(workdir / "gpt2")
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(workdir / "bert")
    (workdir / "phi").mkdir(exist_ok=True)
    (workdir / "phi" / "config.json").write_text(json.dumps({"model_type": "phi", "architectures": ["PhiForCausalLM"]}))
    other = hf_llama.load(str(b))
    hf_llama.attach_tokenizer(other, train_bpe(["a different corpus, a different vocabulary " * 50], 300))
    hf_llama.save(other, str(workdir / "other_tokenizer"))
    # one through the shell (exit status 2, one line, no traceback); the others in-process, where they are raised
    proc = tfuse("fuse", "+experiment=llama_pydoc_tiny", f"parents=[{a},{workdir / 'gpt2'}]", f"hydra.run.dir={workdir / 'bad'}",
                 cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "holds a GPT2LMHeadModel ('gpt2') checkpoint, which model.family=hf_llama does not own" in proc.stderr
    for bad, says in (
        (f"parents=[{a},{workdir / 'bert'}]", "holds a BertForMaskedLM ('bert') checkpoint, which model.family=hf_llama does not own"),
        (f"parents=[{a},{workdir / 'phi'}]", "holds a PhiForCausalLM ('phi') checkpoint"),
        (f"parents=[{a},{workdir / 'other_tokenizer'}]", "have different tokenizers"),
    ):
        with pytest.raises(TfuseError, match=re.escape(says)):
            fuse_in_process(workdir / "bad", "+experiment=llama_pydoc_tiny", bad, f"cache_dir={workdir / 'parents'}",
                            f"statistics_dir={workdir / 'stats'}")


def test_the_statistics_estimate_counts_what_fusion_holds():
    """The shape-only estimate of the statistics equals the bytes of the statistics collected."""
    from tfuse.estimate import DecoderShape, statistics_bytes
    from tfuse.fusion.plan import make_plan
    from tfuse.fusion.statistics import collect_statistics

    a, b = llama(seed=0, mlp=40), llama(seed=1, mlp=40)
    graph = hf_llama.graph(b)
    settings = OTSettings(**{**HARD, "signs": True})
    stats = collect_statistics([a], b, graph, make_plan(graph, settings), BATCHES, calibration().model_inputs, settings)
    held = 0
    for pair in stats.pairs[0].values():
        held += pair.cross.nbytes + sum(t.nbytes for m in (pair.a, pair.b) for t in (m.sum, m.sumsq) if t is not None)
    shape = DecoderShape.from_config(b.config.to_dict())
    estimate = statistics_bytes(shape)
    assert held == estimate["total"] - estimate["layer.attention_input"]
    assert shape.parameters() == sum(p.numel() for p in b.parameters())


def test_gpt2_end_to_end_with_rescale_saves_a_loadable_model(workdir: Path):
    from transformers import AutoModelForCausalLM

    out = workdir / "gpt2_run"
    proc = tfuse("fuse", "+experiment=gpt_pydoc_tiny", "fusion.repair=rescale", "finetune.steps=0",
                 f"hydra.run.dir={out}", f"cache_dir={workdir / 'parents'}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    one_shot = results["one_shot"]
    assert one_shot["ot"]["loss"] < one_shot["vanilla"]["loss"]  # aligned beats plain averaging on trained parents
    assert "greedy continuations" in proc.stdout and set(results["continuations"]["one_shot"]) >= {"ot", "vanilla"}
    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "fused"), GPT2LMHeadModel)
