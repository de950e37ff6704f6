"""scripts/scale_cases.py: the benchmark's parent pairs, built here at tiny sizes (same configs,
shrunk): sharded checkpoints that load, compute one function, and that hard OT with the case's
settings fuses back into parent A; the real sizes are checked on the meta device only."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from tfuse.arch import family, load_parent
from tfuse.fusion.methods.ot import OTSettings, ot_fuse

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scale_cases.py"
spec = importlib.util.spec_from_file_location("scale_cases", SCRIPT)
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)

PUBLISHED_PARAMETERS = {  # the model cards' counts (tied tables once)
    "gpt2-124m": 124_439_808, "qwen2-0.5b": 494_032_768, "tinyllama-1.1b": 1_100_048_384,
    "vit-b16": 86_567_656, "bert-base": 109_514_298, "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("case", list(sc.CASES))
def test_a_tiny_pair_is_sharded_one_function_and_fuses_back_into_parent_a(case, tmp_path):
    dir_a, dir_b = sc.make_pair(case, tmp_path, seed=3, tiny=True)
    for folder in (dir_a, dir_b):
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards  # default: half the model
    assert sc.check_pair(case, dir_a, dir_b, tiny=True) < 1e-5
    a, b = (load_parent(str(d), sc.CASES[case].family, "parent") for d in (dir_a, dir_b))
    assert all(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()) if p.dim() == 2 and p.shape[0] > 1)
    settings = OTSettings(**sc.settings(case), samples=8, batch_size=4)
    data = lambda: sc.batches(case, 8, 4, tokens=16, tiny=True)  # noqa: E731
    fused = ot_fuse([a, b], family(sc.CASES[case].family).graph(a), settings, 0, data, lambda batch: batch).model
    with torch.no_grad():
        for batch in data():
            want, got = a(**batch).logits, fused(**batch).logits
            assert float((want - got).abs().max() / want.abs().max()) < 1e-5


def test_a_bfloat16_pair_keeps_its_dtype_and_small_shards_are_many(tmp_path):
    dir_a, dir_b = sc.make_pair("qwen2-0.5b", tmp_path, dtype=torch.bfloat16, shard_bytes=8_000, tiny=True)
    assert len(list(dir_b.glob("*.safetensors"))) > 5
    assert json.loads((dir_b / "config.json").read_text())["dtype"] == "bfloat16"
    assert sc.check_pair("qwen2-0.5b", dir_a, dir_b, tiny=True) < 1e-5  # an exact relabelling, compared in float32


@pytest.mark.parametrize("case", list(sc.CASES))
def test_the_real_configs_have_the_published_sizes(case):
    with torch.device("meta"):
        model = getattr(transformers, sc.CASES[case].model)(sc.config(case))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[case]


def test_batches_fit_the_model_and_settings_are_valid():
    for case in sc.CASES:
        OTSettings(**sc.settings(case))
        cfg = sc.config(case, tiny=True)
        batch = next(sc.batches(case, 3, 2, tokens=16, tiny=True))
        if sc.CASES[case].images:
            assert batch["pixel_values"].shape == (2, cfg.num_channels, cfg.image_size, cfg.image_size)
        else:
            assert batch["input_ids"].max() < cfg.vocab_size and batch["attention_mask"][:, :8].all()
