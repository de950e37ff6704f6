"""Benchmark OT fusion against the bare forward passes of its parents, and its peak memory.

    python scripts/bench_fuse.py [--case vit] [--samples 200] [--large 2000]

Two paper-sized parents with random weights (ViT: 7 layers, width 384, 12 heads, MLP 1536,
patch 4 on 32x32, 65 tokens) and random inputs. Prints the time of each fusion stage, the time
of the bare forward passes of both parents over the same inputs (the baseline, measured in the
same process), their ratio (each fuse against the mean of the forward passes timed just before
and after it, the median over ``--repeats`` fuses), and the peak resident memory of a fresh
process fusing with ``--samples`` and with ``--large`` samples. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator

import torch

from tfuse.fusion.engine import ot_fuse
from tfuse.fusion.settings import FusionSettings

Batch = dict[str, torch.Tensor]


def vit_case(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    from tfuse.arch import hf_vit

    config = ViTConfig(
        hidden_size=384, num_hidden_layers=7, num_attention_heads=12, intermediate_size=1536,
        image_size=32, patch_size=4, num_channels=3, num_labels=10,
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()

    def batches(samples: int, batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(1234)
        for start in range(0, samples, batch_size):
            yield {"pixel_values": torch.randn(min(batch_size, samples - start), 3, 32, 32, generator=gen)}

    return model, hf_vit.graph, batches


def bert_case(seed: int):
    """Two MiniLM-L6-sized BERT encoders (6 layers, width 384, 12 heads, MLP 1536, vocab 30,522)
    on random token sequences of 128 with ragged padding (padding never counts as a sample)."""
    from transformers import BertConfig, BertForMaskedLM

    from tfuse.arch import hf_bert

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()

    def batches(samples: int, batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(1234)
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            ids = torch.randint(1000, 30522, (n, 128), generator=gen)
            lengths = torch.randint(64, 129, (n,), generator=gen)
            mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
            yield {"input_ids": ids * mask, "attention_mask": mask}

    return model, hf_bert.graph, batches


CASES: dict[str, Callable] = {"vit": vit_case, "bert": bert_case}
CASE_SETTINGS: dict[str, dict] = {"bert": {"tokens": "all"}}  # BERT has no patch grid: every real token


def fuse_once(case: str, samples: int, settings: FusionSettings) -> tuple[float, dict[str, float]]:
    make = CASES[case]
    (a, graph, batches), (b, _, _) = make(0), make(1)
    start = time.perf_counter()
    outcome = ot_fuse([a, b], graph(b), settings, 1, lambda: batches(samples, settings.batch_size), lambda x: x)
    return time.perf_counter() - start, outcome.timings


def forward_once(case: str, samples: int, batch_size: int) -> float:
    make = CASES[case]
    (a, _, batches), (b, _, _) = make(0), make(1)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(samples, batch_size):
            a(**batch)
            b(**batch)
    return time.perf_counter() - start


def peak_rss_mb(case: str, samples: int) -> float:
    """Peak RSS of a fresh process that builds both parents and fuses them."""
    cmd = [sys.executable, __file__, "--case", case, "--child", str(samples)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="vit")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="fuses, each between two forward timings")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # fuse once, print peak RSS (MB)
    args = parser.parse_args()
    settings = FusionSettings(**CASE_SETTINGS.get(args.case, {}))  # the paper's defaults: sinkhorn 0.08, 6x6 window, mean residual
    if args.child:
        fuse_once(args.case, args.child, settings)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    forward_once(args.case, 8, settings.batch_size)  # warm-up
    # Every fuse is bracketed by forward passes (F U F U ... F): its ratio is to the mean of its
    # two neighbours, so a machine that speeds up or slows down over the run cancels out.
    forwards = [forward_once(args.case, args.samples, settings.batch_size)]
    fuses: list[tuple[float, dict[str, float]]] = []
    for _ in range(args.repeats):
        fuses.append(fuse_once(args.case, args.samples, settings))
        forwards.append(forward_once(args.case, args.samples, settings.batch_size))
    ratios = [u / ((before + after) / 2) for (u, _), before, after in zip(fuses, forwards, forwards[1:])]
    ratio = statistics.median(ratios)
    fuse_s, stages = min(fuses, key=lambda f: f[0])
    forward_s = min(forwards)
    print(f"case {args.case}, {args.samples} calibration samples, {torch.get_num_threads()} threads")
    for stage, seconds in stages.items():
        print(f"  {stage:<12} {seconds:8.2f} s")
    print(f"  fuse total   {fuse_s:8.2f} s  (best of {args.repeats})")
    print(f"  forward      {forward_s:8.2f} s  (best of {args.repeats + 1}; bare forward passes of both parents, same inputs)")
    print(f"  ratio        {ratio:8.2f}  (median over the fuses of fuse / mean of the forwards around it; "
          f"each: {', '.join(f'{r:.2f}' for r in ratios)}; best / best: {fuse_s / forward_s:.2f})")
    small, large = peak_rss_mb(args.case, args.samples), peak_rss_mb(args.case, args.large)
    print(f"  peak RSS     {small:8.0f} MB at {args.samples} samples, {large:.0f} MB at {args.large}")
    print(json.dumps({
        "case": args.case, "fuse_s": round(fuse_s, 3), "forward_s": round(forward_s, 3), "ratio": round(ratio, 3),
        "ratio_best": round(fuse_s / forward_s, 3),
        f"peak_rss_mb_{args.samples}": round(small, 1), f"peak_rss_mb_{args.large}": round(large, 1),
    }))


if __name__ == "__main__":
    main()
