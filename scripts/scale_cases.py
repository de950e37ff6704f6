"""Real-size parent pairs for the benchmark, written to disk as checkpoints.

    python scripts/scale_cases.py CASE FOLDER [--seed 0] [--dtype float32] [--tiny] [--check]

Each case is a published architecture (``CASES``) with seeded random weights. Parent A is that
model; parent B is a function-preserving ``symmetric_copy`` of it (every symmetry its flow graph
claims, sign flips included where the graph allows them), so hard OT fusion with the case's
``settings`` recovers A exactly. Both are saved with ``save_pretrained`` in at least two shards
with an index, as published checkpoints of these sizes come, for a fresh process to fuse from the
directories. The command prints one JSON line: the seconds and peak resident memory of
``make_pair``, the shard count, and with ``--check`` the relative logit difference of the pair.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import transformers
from torch import nn

from tfuse.arch import family, load_parent
from tfuse.symmetry import symmetric_copy

Batch = dict[str, torch.Tensor]

HARD = {"tokens": "all", "solver": "emd", "qk": "head_aware", "residual": "global"}  # gpt_plays', vit_mnist's


class Case(NamedTuple):  # not a dataclass: loadable by file path, outside sys.modules
    family: str  # tfuse's model family
    model: str  # the transformers class
    config: dict  # the published config
    tiny: dict  # overrides that shrink it for tests (head layout kept)
    settings: dict  # OT fusion settings that recover A from B exactly
    images: bool = False  # inputs: pixel_values (else input_ids and attention_mask)


CASES: dict[str, Case] = {  # configs as published: openai-community/gpt2, Qwen/Qwen2.5-0.5B,
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, google/vit-base-patch16-224, google-bert/bert-base-uncased,
    # meta-llama/Meta-Llama-3-8B (16 GB a parent in bfloat16: built on the GPU machine, scripts/gpu_check.sh)
    "gpt2-124m": Case(
        "hf_gpt2", "GPT2LMHeadModel",
        dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5,
             activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
        dict(vocab_size=101, n_positions=128, n_embd=32, n_layer=2, n_head=4),
        HARD,  # gpt_plays': LayerNorm centres the stream, no signed spaces
    ),
    "qwen2-0.5b": Case(
        "hf_llama", "Qwen2ForCausalLM",
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151643),
        dict(vocab_size=101, hidden_size=56, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=128),
        {**HARD, "signs": True},  # bench_fuse's "llama": RMSNorm streams flip too
    ),
    "tinyllama-1.1b": Case(
        "hf_llama", "LlamaForCausalLM",
        dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rope_theta=1e4, rms_norm_eps=1e-5,
             tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2),
        dict(vocab_size=101, hidden_size=128, intermediate_size=88, num_hidden_layers=2, max_position_embeddings=128),
        {**HARD, "signs": True},
    ),
    "llama3-8b": Case(
        "hf_llama", "LlamaForCausalLM",
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5,
             tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
        dict(vocab_size=101, hidden_size=128, intermediate_size=88, num_hidden_layers=2, max_position_embeddings=128),
        {**HARD, "signs": True},
    ),
    "vit-b16": Case(
        "hf_vit", "ViTForImageClassification",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
             patch_size=16, num_channels=3, num_labels=1000, layer_norm_eps=1e-12, qkv_bias=True),
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
             num_labels=10),
        HARD, images=True,  # vit_mnist's
    ),
    "bert-base": Case(
        "hf_bert", "BertForMaskedLM",
        dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0),
        dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128),
        {"tokens": "all", "solver": "emd", "residual": "mean", "qk": "separate"},  # bert_mlm's, with emd
    ),
}


def config(case: str, tiny: bool = False) -> transformers.PretrainedConfig:
    spec = CASES[case]
    cls = getattr(transformers, spec.model)
    return cls.config_class(**{**spec.config, **(spec.tiny if tiny else {})})


def build(case: str, seed: int = 0, tiny: bool = False) -> nn.Module:
    """The case's model with seeded random weights; every norm gain and every bias moved off its
    init (ones and zeros), so that a wrong map on either changes the outputs."""
    torch.manual_seed(seed)
    model = getattr(transformers, CASES[case].model)(config(case, tiny)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()  # LayerNorm, LlamaRMSNorm, Qwen2RMSNorm
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
                elif is_norm and name == "weight":
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_pair(
    case: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, shard_bytes: int | None = None,
    tiny: bool = False,
) -> tuple[Path, Path]:
    """Parents A and B of ``case`` saved in ``folder/a`` and ``folder/b``, in shards of at most
    ``shard_bytes`` (default: half the model, so at least two shards and an index). At most two
    models are held at once: B is gathered from A, and A is dropped before B is written."""
    model = build(case, seed, tiny).to(dtype)
    if shard_bytes is None:
        shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    dir_a, dir_b = Path(folder) / "a", Path(folder) / "b"
    model.save_pretrained(dir_a, max_shard_size=shard_bytes)
    graph = family(CASES[case].family).graph(model)
    copy = symmetric_copy(model, graph, seed=seed + 1, signs=True)  # flips only the graph's signed spaces
    del model
    copy.save_pretrained(dir_b, max_shard_size=shard_bytes)
    return dir_a, dir_b


def batches(case: str, samples: int, batch_size: int, tokens: int = 128, seed: int = 0, tiny: bool = False) -> Iterator[Batch]:
    """Random inputs the case's model takes: standard normal images, or token ids anywhere in the
    vocabulary with ragged padding (half to all of ``tokens`` real, then id 0 masked out)."""
    cfg = config(case, tiny)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        if CASES[case].images:
            yield {"pixel_values": torch.randn(n, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)}
            continue
        ids = torch.randint(0, cfg.vocab_size, (n, tokens), generator=gen)
        lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=gen)
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        yield {"input_ids": ids * mask, "attention_mask": mask}


def settings(case: str) -> dict:
    """The OT fusion settings of ``case`` (``OTSettings(**settings(case))``)."""
    return dict(CASES[case].settings)


def check_pair(case: str, dir_a: str | Path, dir_b: str | Path, tiny: bool = False, tolerance: float = 1e-4) -> float:
    """Load both parents as ``tfuse fuse`` does and check that they compute one function: on two
    small batches, the largest logit difference relative to the largest logit stays below
    ``tolerance``. Compared in float32 (B is an exact relabelling of A in any dtype, but a
    lower-precision forward rounds the permuted sums differently). Returns that difference."""
    a, b = (load_parent(str(d), CASES[case].family, f"parent {d}").float().eval() for d in (dir_a, dir_b))
    worst = 0.0
    with torch.no_grad():
        for batch in batches(case, 4, 2, tokens=32, seed=1, tiny=tiny):
            la, lb = a(**batch).logits, b(**batch).logits
            worst = max(worst, float((la - lb).abs().max() / la.abs().max()))
    if not worst < tolerance:
        raise AssertionError(f"{case}: parents in {dir_a} and {dir_b} differ by {worst:.2e} of the logits' scale")
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tiny", action="store_true", help="the case's shrunk config (tests)")
    parser.add_argument("--check", action="store_true", help="load the pair back and compare its logits")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dir_a, dir_b = make_pair(args.case, args.folder, args.seed, getattr(torch, args.dtype), tiny=args.tiny)
    report = {
        "case": args.case, "dtype": args.dtype, "make_pair_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # before any check
        "shards": len(list(dir_b.glob("*.safetensors"))),
    }
    if args.check:
        start = time.perf_counter()
        report["check_rel_diff"] = check_pair(args.case, dir_a, dir_b, tiny=args.tiny)
        report["check_s"] = round(time.perf_counter() - start, 1)
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
