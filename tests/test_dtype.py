"""``model.dtype``: bfloat16 parents fuse into a bfloat16 model saved as such, with float32
statistics; other dtypes cast on load; a bad value is one line; the recipe cache ignores it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import batches_of, fuse_in_process
from tfuse.arch import hf_llama, load_parent, model_dtype, timm_vit
from tfuse.config_keys import _compose
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.fusion.apply import align
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.plan import make_plan
from tfuse.fusion.statistics import collect_statistics
from tfuse.parents import obtain_parents, recipe, recipe_dir
from tfuse.tasks.image_classification import logits

EXPERIMENT = "+experiment=llama_pydoc_tiny"


def llama(tokenizer, seed: int) -> LlamaForCausalLM:
    """A tiny LLaMA of ``llama_pydoc_tiny``'s shape for ``tokenizer``, in float32."""
    torch.manual_seed(seed)
    return hf_llama.attach_tokenizer(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval(), tokenizer)


@pytest.fixture(scope="module")
def bf16_parents(tmp_path_factory) -> list[Path]:
    """Two LLaMA checkpoints saved in bfloat16, with their tokenizer."""
    root = tmp_path_factory.mktemp("bf16_parents")
    tokenizer = train_bpe(["def function(argument): return the value of a Python expression " * 40], 300)
    out = []
    for seed in (0, 1):
        hf_llama.save(llama(tokenizer, seed).to(torch.bfloat16), str(root / f"p{seed}"))
        out.append(root / f"p{seed}")
    return out


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_bf16_parents_fuse_finetune_and_save_in_bf16(bf16_parents: list[Path], tmp_path: Path):
    a, b = bf16_parents
    assert safetensors_dtypes(a) == {torch.bfloat16}
    results = fuse_in_process(tmp_path / "run", EXPERIMENT, f"parents=[{a},{b}]", "model.dtype=auto", "device=cpu",
                              "fusion.repair=lstsq", "fusion.repair_samples=32", "finetune.steps=2",
                              f"statistics_dir={tmp_path / 'stats'}")
    for name in ("parent_0", "ensemble", "vanilla", "ot"):
        assert torch.isfinite(torch.tensor(results["one_shot"][name]["loss"])), name
    assert results["repair"]["ot"]["mean_error_after"] < results["repair"]["ot"]["mean_error_before"]
    assert torch.isfinite(torch.tensor(results["finetuned"]["ot"]["loss"]))  # finetuned in bfloat16
    for kind in ("fused", "finetuned"):
        folder = tmp_path / "run" / kind
        assert safetensors_dtypes(folder) == {torch.bfloat16}, kind
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
        assert {p.dtype for p in hf_llama.load(str(folder)).parameters()} == {torch.bfloat16}


def test_engine_keeps_bf16_and_reads_float32_statistics(bf16_parents: list[Path]):
    models = [hf_llama.load(str(p)) for p in bf16_parents]
    ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 16, dtype=torch.long)} for i in (0, 4)]
    graph = hf_llama.graph(models[0])
    settings = OTSettings(solver="sinkhorn", qk="head_aware", residual="global", tokens="all", samples=8, batch_size=4,
                          repair="lstsq", signs=True)
    stats = collect_statistics([models[1]], models[0], graph, make_plan(graph, settings), batches, dict, settings)
    for space, pair in stats.pairs[0].items():
        assert pair.cross.dtype == torch.float32 and torch.isfinite(pair.cross).all(), space

    outcome = ot_fuse(models, graph, settings, 0, lambda: iter(batches), dict)
    assert {p.dtype for p in outcome.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(outcome.model(input_ids=ids).logits).all()
    # soft maps: aligned in float32 and rounded once, into each parameter's own dtype
    state = parameters(models[1], graph)
    wide = align({n: w.float() for n, w in state.items()}, graph, make_plan(graph, settings), outcome.maps[1])
    narrow = align(state, graph, make_plan(graph, settings), outcome.maps[1])
    assert all(narrow[n].dtype == torch.bfloat16 and torch.equal(narrow[n], wide[n].to(torch.bfloat16)) for n in state)


def tiny_timm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm_vit.create("vit_tiny_patch16_224", dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                                                        depth=2, num_heads=4, mlp_ratio=2.0)).eval()


def test_bf16_image_models_take_float32_pixels_and_give_float32_logits(images: torch.Tensor):
    models = [tiny_timm(seed).to(torch.bfloat16) for seed in (0, 1)]  # timm's first layer does not cast its input
    graph = timm_vit.graph(models[0])
    settings = OTSettings(tokens="all", samples=48, batch_size=16)
    stats = collect_statistics([models[1]], models[0], graph, make_plan(graph, settings), batches_of(images, 16)(),
                               lambda b: b, settings)
    assert all(p.cross.dtype == torch.float32 and torch.isfinite(p.cross).all() for p in stats.pairs[0].values())
    assert logits(models[0], images).dtype == torch.float32


def test_float32_loads_bf16_checkpoints_in_float32(bf16_parents: list[Path], tmp_path: Path):
    a, b = bf16_parents
    for dtype, want in (("float32", torch.float32), ("auto", torch.bfloat16), ("float16", torch.float16)):
        cfg = _compose([EXPERIMENT, f"parents=[{a},{b}]", f"model.dtype={dtype}"])
        parents = obtain_parents(cfg, None, "cpu")
        assert all({p.dtype for p in parent.model.parameters()} == {want} for parent in parents), dtype
    timm_vit.save(tiny_timm(0).to(torch.bfloat16), str(tmp_path / "timm"))  # timm builds in float32: auto reads the file
    for dtype, want in (("float32", torch.float32), ("auto", torch.bfloat16)):
        loaded = load_parent(str(tmp_path / "timm"), "timm_vit", "parents[0]", model_dtype({"dtype": dtype}))
        assert {p.dtype for p in loaded.parameters()} == {want}, dtype


def test_a_bad_dtype_is_one_line(bf16_parents: list[Path]):
    cfg = _compose([EXPERIMENT, f"parents=[{bf16_parents[0]},{bf16_parents[1]}]", "model.dtype=float8"])
    with pytest.raises(TfuseError) as err:
        obtain_parents(cfg, None, "cpu")
    assert str(err.value) == "model.dtype='float8' is not known; allowed: auto, bfloat16, float16, float32"


def test_the_recipe_key_ignores_dtype_and_a_cached_parent_is_cast(tmp_path: Path):
    keys = set()
    for dtype in ("auto", "bfloat16", "float32", None):  # None: a config from before model.dtype
        cfg = _compose([EXPERIMENT, f"cache_dir={tmp_path}", "n_parents=1"] + ([f"model.dtype={dtype}"] if dtype else []))
        if dtype is None:
            with open_dict(cfg):
                del cfg.model["dtype"]
        assert "dtype" not in recipe(cfg, 0)["model"]
        keys.add(recipe_dir(cfg, 0, (0, 1)))
    assert len(keys) == 1
    cached = keys.pop()
    hf_llama.save(llama(train_bpe(["some text " * 20], 280), 0), str(cached))  # as a recipe parent: float32
    cfg = _compose([EXPERIMENT, f"cache_dir={tmp_path}", "n_parents=1", "model.dtype=bfloat16"])
    (parent,) = obtain_parents(cfg, None, "cpu")
    assert parent.source == str(cached) and {p.dtype for p in parent.model.parameters()} == {torch.bfloat16}
    assert safetensors_dtypes(cached) == {torch.float32}
