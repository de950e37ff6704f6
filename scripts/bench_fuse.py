"""Benchmark OT fusion against the bare forward passes of its parents, and its peak memory.

    python scripts/bench_fuse.py [--case vit] [--samples 200] [--large 2000] [--repair lstsq] [--device cpu]
                                 [--only fuse,repair,memory] [--repeats 3]
    python scripts/bench_fuse.py --case gpt2-124m [--samples 32] [--tokens 128] [--repair none] [--dtype float32]
                                 [--scale-dir outputs/scale/gpt2-124m] [--only fuse,memory] [--repeats 3]
    python scripts/bench_fuse.py --estimate llama-1b,llama-7b[,path/config.json]

Two paper-sized parents with random weights (ViT: 7 layers, width 384, 12 heads, MLP 1536, patch 4
on 32x32, 65 tokens; ``vitb``: ViT-B/16, 12 layers, width 768, 12 heads, MLP 3072, patch 16 on
224x224, 197 tokens, 1,000 calibration samples by default; ``llama``: a LLaMA-shaped decoder, 6
layers, width 384, 6 query heads over 2 key/value heads, SwiGLU 1,024, 128 tokens, with the
``llama_plays`` fusion settings) and random inputs. ``--only`` picks the sections (default
``fuse,repair,memory``, about 6 minutes for ``vit`` on 2 cores; README.md gives each one's time):

``fuse``: the time of each fusion stage, the time of the bare forward passes of both parents over
the same inputs (the baseline, measured in the same process), their ratio (each fuse against the
mean of the forward passes timed just before and after it, the median over ``--repeats`` fuses).
``repair``: the same for fusion followed by ``--repair`` on ``--samples`` repair samples
(``repair_ratio``, ``repair_s``), its fuses interleaved with ``fuse``'s. ``memory``: the peak
resident memory of a fresh process fusing with ``--samples`` and with ``--large`` samples.
``repair_memory``: the same with ``--samples`` and ``--large`` repair samples (the longest
section: the repair's time grows with its samples). ``sweep``: an 8-value reg sweep, as 8
independent fuses (``sweep8_uncached_s``) and through the statistics cache (``sweep8_cached_s``:
the first fuse streams, the others reuse its statistics). Ends with one JSON line, every key
present whatever ``--only`` says (null for a section not run, or a repair one under ``--repair
none``). ``--case llama`` also prints the shape-only estimate (``tfuse/estimate.py``) of its
statistics and transport time beside the measured ones. ``--estimate`` prints, for LLaMA-shaped
checkpoints (presets or ``config.json`` files), the statistics memory per space and in all, the
weights held, the repair's memory and the exact-OT solve time at this machine's measured speed.

Scale cases (``scripts/scale_cases.py``: ``gpt2-124m``, ``qwen2-0.5b``, ``tinyllama-1.1b``,
``llama3-8b``, ``vit-b16``, ``bert-base``): published architectures at full size, parent B a
function-preserving relabelling of A, fused by the streamed engine (``tfuse.fusion.stream``) from
checkpoints that a child process builds once into ``--scale-dir`` (reused while both parents'
indexes are there) in ``--dtype``. ``--samples`` sequences (default 32; images for ``vit-b16``) of
``--tokens`` (default 128) in batches of 8; ``--repair`` none (default) or lstsq on
``--repair-samples`` (default: the same batches); ``--tiny`` shrinks the case (tests). Sections
(default both): ``fuse``: stream_fuse's seconds and stage timings against the bare forward
passes of both parents (loaded whole beforehand) over the same batches, bracketed as above.
``memory``: a fresh process that builds the lazy parents and streams the fuse, its peak RSS
right after (``peak_rss_mb``, and as a multiple of one parent's weight bytes), its fuse's
seconds and stages, and the recovery error: the largest logit difference of the fused model
and parent A over 2 batches, relative to A's largest logit (0 when fusion undoes the relabelling
exactly). One JSON line at the end, every key present (``scale_keys``).

``--device cuda``: models and inputs on the GPU (the inputs drawn on the CPU, as for ``cpu``),
every timer read after ``torch.cuda.synchronize()``, and the peak GPU memory
(``torch.cuda.max_memory_allocated``) of the timed fuses (``peak_gpu_mb``) and of each fresh
process (``peak_gpu_mb_N``, ``peak_gpu_mb_repair_N``) beside its peak RSS; for a scale case, the
lazy parents read onto the GPU and the fresh process's peak (``peak_gpu_mb``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.methods.ot import OTSettings, ot_fuse

Batch = dict[str, torch.Tensor]
ROOT = Path(__file__).resolve().parents[1]
SCALE_SCRIPT = Path(__file__).with_name("scale_cases.py")


def _scale_cases():
    """scripts/scale_cases.py, loaded by its path (this file also runs as a module of the tests)."""
    spec = importlib.util.spec_from_file_location("scale_cases", SCALE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCALE = _scale_cases()


def vit_case(seed: int):
    return _vit(seed, hidden_size=384, num_hidden_layers=7, num_attention_heads=12, intermediate_size=1536,
                image_size=32, patch_size=4, num_labels=10)


def vitb_case(seed: int):
    """ViT-B/16 sized: 12 layers, width 768, 12 heads, MLP 3072, 224x224 in patches of 16 (197 tokens)."""
    return _vit(seed, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16, num_labels=1000)


def _vit(seed: int, **config):
    from transformers import ViTConfig, ViTForImageClassification

    from tfuse.arch import hf_vit

    size = config["image_size"]
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(num_channels=3, **config)).eval()

    def batches(samples: int, batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(1234)
        for start in range(0, samples, batch_size):
            yield {"pixel_values": torch.randn(min(batch_size, samples - start), 3, size, size, generator=gen)}

    return model, hf_vit.graph, batches


def ragged_tokens(low: int, high: int) -> Callable[[int, int], Iterator[Batch]]:
    """Random token sequences of 128 (ids in [low, high)) with ragged padding: 64 to 128 real tokens."""

    def batches(samples: int, batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(1234)
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            ids = torch.randint(low, high, (n, 128), generator=gen)
            lengths = torch.randint(64, 129, (n,), generator=gen)
            mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
            yield {"input_ids": ids * mask, "attention_mask": mask}

    return batches


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

    return model, hf_bert.graph, ragged_tokens(1000, 30522)


def llama_case(seed: int):
    """Two LLaMA-shaped decoders (6 layers, width 384, 6 query heads over 2 key/value heads of 64,
    SwiGLU 1024, vocab 8,192, tied embeddings) on random token sequences of 128 with ragged padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tfuse.arch import hf_llama

    config = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    return model, hf_llama.graph, ragged_tokens(2, 8192)


CASES: dict[str, Callable] = {"vit": vit_case, "vitb": vitb_case, "bert": bert_case, "llama": llama_case}
CASE_SETTINGS: dict[str, dict] = {  # BERT and LLaMA have no patch grid: every real token
    "bert": {"tokens": "all"},
    "llama": {"tokens": "all", "solver": "emd", "qk": "head_aware", "residual": "global", "signs": True},  # llama_plays'
}
SCALE_SAMPLES = 32
CASE_SAMPLES: dict[str, int] = {"vitb": 1000, **dict.fromkeys(SCALE.CASES, SCALE_SAMPLES)}  # else DEFAULT_SAMPLES
DEFAULT_SAMPLES = 200
SCALE_BATCH = 8  # sequences a batch: 8 x 2,048 tokens of an 8B model still fit one GPU
SCALE_DEFAULTS = {"tokens": 128, "dtype": "float32", "repair_samples": None, "scale_dir": None, "tiny": False}


SWEEP_REGS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2)


def now(device: str) -> float:
    """``perf_counter`` once the device has finished the work queued on it (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def pair(case: str, device: str):
    """Both parents of ``case`` on ``device``, the graph builder, and a batch factory whose
    batches land on ``device`` (drawn on the CPU: the same inputs on every device)."""
    make = CASES[case]
    (a, graph, batches), (b, _, _) = make(0), make(1)

    def on_device(samples: int, batch_size: int) -> Iterator[Batch]:
        for batch in batches(samples, batch_size):
            yield {k: v.to(device) for k, v in batch.items()}

    return a.to(device), b.to(device), graph, on_device


def fuse_once(
    case: str, samples: int, settings: OTSettings, cache: StatisticsCache | None = None, device: str = "cpu"
) -> tuple[float, dict[str, float]]:
    a, b, graph, batches = pair(case, device)
    start = now(device)
    outcome = ot_fuse(
        [a, b], graph(b), settings, 1, lambda: batches(samples, settings.batch_size), lambda x: x,
        repair_calibration=lambda: batches(settings.repair_samples, settings.batch_size), cache=cache,
    )
    return now(device) - start, outcome.timings


def sweep_seconds(case: str, samples: int, settings: OTSettings, cached: bool, device: str = "cpu") -> float:
    """Fusion time of a reg sweep (model building excluded), through a fresh cache or none."""
    with tempfile.TemporaryDirectory() as folder:
        cache = StatisticsCache(Path(folder), {"case": case}) if cached else None
        return sum(fuse_once(case, samples, dataclasses.replace(settings, reg=reg), cache, device)[0] for reg in SWEEP_REGS)


def forward_once(case: str, samples: int, batch_size: int, device: str = "cpu") -> float:
    a, b, _, batches = pair(case, device)
    start = now(device)
    with torch.no_grad():
        for batch in batches(samples, batch_size):
            a(**batch)
            b(**batch)
    return now(device) - start


def peak_of_this_process_mb() -> float:
    """Peak resident memory of this process image: VmHWM (ru_maxrss would carry over the peak of
    the process that forked it, here the benchmark itself)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mb(case: str, samples: int, repair: str = "none", repair_samples: int = 0,
                device: str = "cpu") -> tuple[float, float | None, float]:
    """Peak RSS of a fresh process that builds both parents and fuses them (then repairs), its
    peak GPU memory on ``cuda`` (None on ``cpu``), and the process's wall time in seconds."""
    cmd = [sys.executable, __file__, "--case", case, "--child", str(samples), "--device", device]
    if repair != "none":
        cmd += ["--repair", repair, "--child-repair", str(repair_samples)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    values = [float(v) for v in out.stdout.strip().splitlines()[-1].split()]
    return values[0], values[1] if len(values) > 1 else None, seconds


SECTIONS: dict[str, str] = {  # --only: each section, what it measures (the JSON keys it fills)
    "fuse": "the fuse against the bare forward passes of both parents (fuse_s, ratio, ratio_best, forward_s)",
    "repair": "the fuse followed by --repair, the same way (repair_fuse_s, repair_s, repair_ratio, repair_ratio_best)",
    "memory": "peak RSS of a fresh process fusing --samples, and of one fusing --large samples (peak_rss_mb_N)",
    "repair_memory": "the same for fuse + --repair on --samples and on --large repair samples (peak_rss_mb_repair_N)",
    "sweep": "an 8-value reg sweep as independent fuses and through the statistics cache (sweep8_*)",
}
DEFAULT_ONLY = "fuse,repair,memory"
DEFAULT_REPEATS = 3


SCALE_SECTIONS: dict[str, str] = {  # --only of the scale cases
    "fuse": "stream_fuse against the bare forward passes of both parents (fuse_s, stages, ratio, ratio_best, forward_s)",
    "memory": "a fresh process streaming the fuse: peak RSS, its fuse's time, the recovery error (peak_rss_mb, "
              "peak_rss_x_parent, memory_fuse_s, memory_stages, recovery_error)",
}


def sections_of(text: str, available: dict[str, str] = SECTIONS) -> list[str]:
    """The sections named in ``--only`` (comma-separated, ``all`` for every one), in the script's
    order; ValueError names an unknown one."""
    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        return list(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown section {', '.join(repr(n) for n in unknown)} (choose from {', '.join(available)})")
    return [name for name in available if name in names]


def fail(message: str) -> None:
    """Exit as argparse does (status 2), in one line without the usage."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*sorted(CASES), *SCALE.CASES], default="vit")
    parser.add_argument("--samples", type=int, help=f"calibration samples (default: {DEFAULT_SAMPLES}; vitb "
                                                    f"{CASE_SAMPLES['vitb']}; the scale cases {SCALE_SAMPLES})")
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"fuses (and fuses + repair), each between two forward timings (default: {DEFAULT_REPEATS})")
    parser.add_argument("--repair", choices=("none", "rescale", "lstsq"),
                        help="also time fusion followed by this repair (default: lstsq; none: skip); the scale cases "
                             "fuse with it (none, the default, or lstsq)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help=f"comma-separated sections to run, or all (default: {DEFAULT_ONLY}): "
                             + "; ".join(f"{name}: {what}" for name, what in SECTIONS.items())
                             + f"; the scale cases: {', '.join(SCALE_SECTIONS)} (default both): "
                             + "; ".join(f"{name}: {what}" for name, what in SCALE_SECTIONS.items())
                             + "; a section not run leaves its keys null")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models and inputs live")
    parser.add_argument("--estimate", metavar="SHAPES",
                        help="comma-separated presets (llama-1b, llama-7b) or config.json paths: print what fusing two such "
                             "checkpoints needs, from the shapes and this machine's measured solver speed, and exit")
    scale = parser.add_argument_group(f"scale cases ({', '.join(SCALE.CASES)}) only")
    scale.add_argument("--tokens", type=int, help=f"tokens a sequence (default: {SCALE_DEFAULTS['tokens']})")
    scale.add_argument("--repair-samples", type=int, help="sequences the repair refits on (default: --samples, the same batches)")
    scale.add_argument("--dtype", choices=("float32", "bfloat16"), help="the parents' stored dtype (default: float32)")
    scale.add_argument("--scale-dir", type=Path, help="where the pair is built, or reused once there (default: "
                                                      "outputs/scale/CASE, -bfloat16 and -tiny appended for those)")
    scale.add_argument("--tiny", action="store_true", default=None, help="the case's shrunk config (tests)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # fuse once, print peak RSS (MB)
    parser.add_argument("--child-repair", type=int, help=argparse.SUPPRESS)  # ... with this many repair samples
    parser.add_argument("--child-stream", action="store_true", help=argparse.SUPPRESS)  # a scale case's memory child
    args = parser.parse_args(argv)
    scaled = args.case in SCALE.CASES
    try:
        only = args.only if args.only is not None else "all" if scaled else DEFAULT_ONLY
        args.only = sections_of(only, SCALE_SECTIONS if scaled else SECTIONS)
    except ValueError as error:
        fail(f"--only: {error}")
    if args.repeats < 1:
        fail(f"--repeats: at least 1, not {args.repeats}")
    if args.samples is None:
        args.samples = CASE_SAMPLES.get(args.case, DEFAULT_SAMPLES)
    if scaled:
        scale_defaults(args)
    else:
        given = [key for key in SCALE_DEFAULTS if getattr(args, key) is not None]
        if given:
            fail(f"--{given[0].replace('_', '-')}: for the scale cases only ({', '.join(SCALE.CASES)})")
        args.repair = args.repair or "lstsq"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    return args


def scale_defaults(args: argparse.Namespace) -> None:
    """A scale case's unset options: SCALE_DEFAULTS, the repair on the calibration batches, the
    pair's folder by case, dtype and size."""
    args.repair = args.repair or "none"
    for key, value in SCALE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.repair_samples = args.repair_samples or args.samples
    if args.scale_dir is None:
        suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + ("-tiny" if args.tiny else "")
        args.scale_dir = ROOT / "outputs" / "scale" / f"{args.case}{suffix}"


def summary_keys(case: str, device: str, samples: int, large: int) -> list[str]:
    """Every key of the JSON line, in its order: the same for every --only (a section not run leaves its keys null)."""
    sizes = (samples, large)
    keys = ["case", "device", *(["peak_gpu_mb"] if device == "cuda" else []),
            "fuse_s", "ratio", "ratio_best", "repair_fuse_s", "repair_s", "repair_ratio", "repair_ratio_best", "forward_s",
            *(f"peak_rss_mb_{n}" for n in sizes), *(f"peak_rss_mb_repair_{n}" for n in sizes)]
    if device == "cuda":
        keys += [*(f"peak_gpu_mb_{n}" for n in sizes), *(f"peak_gpu_mb_repair_{n}" for n in sizes)]
    if case == "llama":
        keys += ["estimate_statistics_mb", "estimate_transport_s", "transport_s"]
    return keys + ["sweep8_uncached_s", "sweep8_cached_s", "sweep8_cached_per_fuse"]


def scale_keys(device: str) -> list[str]:
    """Every key of a scale case's JSON line, in its order (a section not run leaves its keys null)."""
    return ["case", "device", "samples", "tokens", "repair", "repair_samples", "dtype", "parameters",
            "fuse_s", "stages", "ratio", "ratio_best", "forward_s", "memory_fuse_s", "memory_stages",
            "peak_rss_mb", "peak_rss_x_parent", *(["peak_gpu_mb"] if device == "cuda" else []), "recovery_error"]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"


Run = tuple[float, dict[str, float]]  # a fuse's seconds and its stage timings


def bracketed(fuses: dict[str, Callable[[], Run]], forward: Callable[[], float], repeats: int
              ) -> tuple[dict[str, list[Run]], dict[str, list[float]], list[float]]:
    """``repeats`` rounds of every kind of fuse, each fuse followed by a forward timing (F U F R F
    U F R ... F): each fuse's ratio is to the mean of the forwards around it, so a machine that
    speeds up or slows down cancels out. The runs and ratios by kind, and every forward's time."""
    forwards = [forward()]
    runs: dict[str, list[Run]] = {kind: [] for kind in fuses}
    ratios: dict[str, list[float]] = {kind: [] for kind in fuses}
    for _ in range(repeats):
        for kind, fuse in fuses.items():
            runs[kind].append(fuse())
            forwards.append(forward())
            ratios[kind].append(runs[kind][-1][0] / ((forwards[-2] + forwards[-1]) / 2))
    return runs, ratios, forwards


def report_fuses(label: str, runs: list[Run], ratios: list[float], forward_s: float) -> tuple[float, dict[str, float], float]:
    """Print the best fuse's stages and total and the median ratio; return those three."""
    total, stages = min(runs, key=lambda f: f[0])
    ratio = statistics.median(ratios)
    print(f"{label}:")
    for stage, seconds in stages.items():
        print(f"  {stage:<12} {seconds:8.2f} s")
    print(f"  total        {total:8.2f} s  (best of {len(runs)})")
    print(f"  ratio        {ratio:8.2f}  (median over the fuses of fuse / mean of the forwards around it; "
          f"each: {', '.join(f'{r:.2f}' for r in ratios)}; best / best: {total / forward_s:.2f})")
    return total, stages, ratio


def scale_pair(args: argparse.Namespace) -> Path:
    """The case's pair in ``--scale-dir``, built by scale_cases.py in a child process (its memory is
    not this process's) unless both parents' indexes are there: save_pretrained writes a
    sharded checkpoint's index last, so a build cut short is built again."""
    folder = args.scale_dir
    if all((folder / x / "model.safetensors.index.json").exists() for x in "ab"):
        print(f"pair: reusing {folder}")
        return folder
    cmd = [sys.executable, str(SCALE_SCRIPT), args.case, str(folder), "--dtype", args.dtype, *(["--tiny"] if args.tiny else [])]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    print(f"pair: built in {folder}: {out.stdout.strip().splitlines()[-1]}")
    return folder


def scale_batches(args: argparse.Namespace, samples: int) -> list[Batch]:
    """The case's first ``samples`` inputs in batches on ``--device``, images in ``--dtype``."""
    dtype = getattr(torch, args.dtype)
    return [{k: v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device) for k, v in batch.items()}
            for batch in SCALE.batches(args.case, samples, SCALE_BATCH, tokens=args.tokens, tiny=args.tiny)]


def stream_once(args: argparse.Namespace, data: list[Batch], repair_data: list[Batch]):
    """stream_fuse of the pair into parent A (the anchor) from the checkpoints: its seconds
    (the lazy parents' building excluded) and its outcome."""
    from tfuse.arch import family
    from tfuse.arch.lazy import lazy_parent
    from tfuse.fusion.stream import stream_fuse

    fam = SCALE.CASES[args.case].family
    settings = OTSettings(**SCALE.settings(args.case), samples=args.samples, batch_size=SCALE_BATCH,
                          repair=args.repair, repair_samples=args.repair_samples)
    parents = [lazy_parent(str(args.scale_dir / x), fam, f"parent {x}", device=args.device) for x in "ab"]
    start = now(args.device)
    outcome = stream_fuse(parents, family(fam).graph(parents[0].model), settings, 0, lambda: iter(data),
                          lambda batch: batch, repair_calibration=lambda: iter(repair_data))
    return now(args.device) - start, outcome


def whole_parent(args: argparse.Namespace, name: str) -> torch.nn.Module:
    """Parent ``name`` (a or b) loaded whole by from_pretrained, on ``--device``, with no KV cache
    (the fuse's passes keep none either)."""
    from tfuse.arch import load_parent

    model = load_parent(str(args.scale_dir / name), SCALE.CASES[args.case].family, f"parent {name}",
                        getattr(torch, args.dtype)).to(args.device).eval()
    model.config.use_cache = False
    return model


def scale_data(args: argparse.Namespace) -> tuple[list[Batch], list[Batch]]:
    """The calibration batches, and the repair's (the same ones unless --repair-samples differs)."""
    data = scale_batches(args, args.samples)
    return data, data if args.repair_samples == args.samples else scale_batches(args, args.repair_samples)


def scale_child(args: argparse.Namespace) -> None:
    """The memory section's fresh process: the streamed fuse, then this process's peak memory as
    it ends (nothing else held yet), then the recovery error; one JSON line."""
    data, repair_data = scale_data(args)
    seconds, outcome = stream_once(args, data, repair_data)
    report = {"fuse_s": seconds, "stages": outcome.timings, "peak_rss_mb": peak_of_this_process_mb(),
              "peak_gpu_mb": peak_gpu_mb() if args.device == "cuda" else None}
    a, fused, worst = whole_parent(args, "a"), outcome.model, 0.0
    with torch.no_grad():
        for batch in data[:2]:
            want, got = a(**batch).logits, fused(**batch).logits
            worst = max(worst, float((want - got).abs().max().float() / want.abs().max().float()))
    print(json.dumps({**report, "recovery_error": worst}))


def scale_main(args: argparse.Namespace) -> None:
    """A scale case's sections (SCALE_SECTIONS) and its JSON line (scale_keys)."""
    from tfuse.arch.lazy import lazy_parent

    device, only = args.device, args.only
    folder = scale_pair(args)
    skeleton = lazy_parent(str(folder / "a"), SCALE.CASES[args.case].family, "parent a").model  # on the meta device
    parameters = sum(p.numel() for p in skeleton.parameters())
    weight_mb = parameters * getattr(torch, args.dtype).itemsize / 2**20
    images = SCALE.CASES[args.case].images
    inputs = "images" if images else f"sequences x {args.tokens} tokens"
    print(f"case {args.case} ({parameters / 1e6:.1f} M parameters in {args.dtype}, {weight_mb:.0f} MB a parent), "
          f"{args.samples} {inputs}, repair {args.repair}" + (f" on {args.repair_samples}" if args.repair != "none" else "")
          + f", {device} ({device_name(device)}); sections: {', '.join(only)}")
    summary: dict[str, object] = dict.fromkeys(scale_keys(device))
    summary.update({"case": args.case, "device": device, "samples": args.samples, "tokens": None if images else args.tokens,
                    "repair": args.repair, "repair_samples": args.repair_samples, "dtype": args.dtype,
                    "parameters": parameters})
    if "fuse" in only:
        began = time.perf_counter()
        data, repair_data = scale_data(args)
        parents = [whole_parent(args, x) for x in "ab"]

        def forward(batches: list[Batch] = data) -> float:
            start = now(device)
            with torch.no_grad():
                for batch in batches:
                    for model in parents:
                        model(**batch)
            return now(device) - start

        def fuse() -> Run:
            seconds, outcome = stream_once(args, data, repair_data)
            return seconds, outcome.timings  # the fused model freed before the next forward

        forward(data[:1])  # warm-up
        runs, ratios, forwards = bracketed({"fuse": fuse}, forward, args.repeats)
        forward_s = min(forwards)
        total, stages, ratio = report_fuses(f"stream fuse (repair={args.repair})", runs["fuse"], ratios["fuse"], forward_s)
        print(f"  forward      {forward_s:8.2f} s  (best of {len(forwards)}; bare forward passes of both parents, same batches)")
        print(f"  [fuse: {time.perf_counter() - began:.0f} s]")
        summary.update({"fuse_s": round(total, 3), "stages": {k: round(v, 3) for k, v in stages.items()},
                        "ratio": round(ratio, 3), "ratio_best": round(total / forward_s, 3), "forward_s": round(forward_s, 3)})
        del parents  # off the host before the memory child, whose hidden-state budget is half the free memory
    if "memory" in only:
        cmd = [sys.executable, __file__, "--case", args.case, "--samples", str(args.samples), "--tokens", str(args.tokens),
               "--repair", args.repair, "--repair-samples", str(args.repair_samples), "--dtype", args.dtype,
               "--scale-dir", str(folder), "--device", device, *(["--tiny"] if args.tiny else []), "--child-stream"]
        start = time.perf_counter()
        child = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1])
        took = time.perf_counter() - start
        rss = child["peak_rss_mb"]
        print(f"  peak RSS     {rss:8.0f} MB = {rss / weight_mb:.2f} x one parent's {args.dtype} weights, in a fresh process "
              f"streaming the fuse ({child['fuse_s']:.2f} s: "
              + ", ".join(f"{k} {v:.2f}" for k, v in child["stages"].items()) + ")"
              + (f"; peak GPU {child['peak_gpu_mb']:.0f} MB" if device == "cuda" else ""))
        print(f"  recovery     {child['recovery_error']:8.1e}  (max |fused - A| / max |A| of the logits over 2 batches)"
              f"  [memory: a fresh process of {took:.0f} s]")
        summary.update({"memory_fuse_s": round(child["fuse_s"], 3),
                        "memory_stages": {k: round(v, 3) for k, v in child["stages"].items()},
                        "peak_rss_mb": round(rss, 1), "peak_rss_x_parent": round(rss / weight_mb, 2),
                        "recovery_error": child["recovery_error"]})
        if device == "cuda":
            summary["peak_gpu_mb"] = round(child["peak_gpu_mb"], 1)
    print(json.dumps(summary))


def main() -> None:
    args = parse_args()
    device = args.device
    if args.estimate:
        estimate(args.estimate.split(","), args.samples, args.large)
        return
    if args.case in SCALE.CASES:
        (scale_child if args.child_stream else scale_main)(args)
        return
    settings = OTSettings(**CASE_SETTINGS.get(args.case, {}))  # the paper's defaults: sinkhorn 0.08, 6x6 window, mean residual
    repaired = dataclasses.replace(settings, repair=args.repair, repair_samples=args.samples)
    if args.child:
        child = settings
        if args.child_repair:
            child = dataclasses.replace(settings, repair=args.repair, repair_samples=args.child_repair)
        fuse_once(args.case, args.child, child, device=device)
        print(peak_of_this_process_mb(), *([peak_gpu_mb()] if device == "cuda" else []))
        return
    only = args.only
    print(f"case {args.case}, {args.samples} calibration samples, {device} ({device_name(device)}); sections: {', '.join(only)}"
          + (" (repair ones skipped: --repair none)" if args.repair == "none" and {"repair", "repair_memory"} & set(only) else ""))
    summary: dict[str, object] = dict.fromkeys(summary_keys(args.case, device, args.samples, args.large))
    summary.update({"case": args.case, "device": device})
    kinds = {kind: (lambda chosen=chosen: fuse_once(args.case, args.samples, chosen, device=device))
             for kind, chosen in (("fuse", settings), ("repair", repaired))
             if kind in only and not (kind == "repair" and args.repair == "none")}
    runs: dict[str, list[Run]] = {}
    if kinds:
        began = time.perf_counter()
        forward_once(args.case, 8, settings.batch_size, device)  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs, ratios, forwards = bracketed(
            kinds, lambda: forward_once(args.case, args.samples, settings.batch_size, device), args.repeats)
        forward_s = min(forwards)
        if device == "cuda":
            summary["peak_gpu_mb"] = round(peak_gpu_mb(), 1)
        for kind, label in (("fuse", "fuse"), ("repair", f"fuse + repair={args.repair}")):
            if kind not in runs:
                continue
            total, stages, ratio = report_fuses(label, runs[kind], ratios[kind], forward_s)
            if kind == "fuse":
                summary.update({"fuse_s": round(total, 3), "ratio": round(ratio, 3), "ratio_best": round(total / forward_s, 3)})
            else:
                summary.update({"repair_fuse_s": round(total, 3), "repair_s": round(stages["repair"], 3),
                                "repair_ratio": round(ratio, 3), "repair_ratio_best": round(total / forward_s, 3)})
        print(f"  forward      {forward_s:8.2f} s  (best of {len(forwards)}; bare forward passes of both parents, same inputs)")
        summary["forward_s"] = round(forward_s, 3)
        print(f"  [{' + '.join(kinds)}: {time.perf_counter() - began:.0f} s]")
    gpu: dict[str, float | None] = {}
    for section, key, of in (("memory", "peak_rss_mb_", "at {} samples, {} MB at {}"),
                             ("repair_memory", "peak_rss_mb_repair_", "with {} repair samples, {} MB with {}")):
        if section not in only or (section == "repair_memory" and args.repair == "none"):
            continue
        seconds = []
        for n in (args.samples, args.large):  # the repair's children calibrate on --samples and repair on n
            rss, gpu_mb, took = (peak_rss_mb(args.case, n, device=device) if section == "memory"
                                 else peak_rss_mb(args.case, args.samples, args.repair, n, device))
            summary[f"{key}{n}"] = round(rss, 1)
            gpu[f"{key.replace('rss', 'gpu')}{n}"] = gpu_mb
            seconds.append(took)
        small, large = summary[f"{key}{args.samples}"], summary[f"{key}{args.large}"]
        print(f"  peak RSS     {small:8.0f} MB {of.format(args.samples, f'{large:.0f}', args.large)}"
              f"  [{section}: fresh processes of {seconds[0]:.0f} s and {seconds[1]:.0f} s]")
    if device == "cuda" and gpu:
        print("  peak GPU     " + (f"{summary['peak_gpu_mb']:8.0f} MB in the timed fuses; " if kinds else "")
              + "fresh processes: " + ", ".join(f"{key.removeprefix('peak_gpu_mb_')} {mb:.0f} MB" for key, mb in gpu.items()))
        summary.update({key: round(mb, 1) for key, mb in gpu.items()})
    if args.case == "llama":  # the shape-only estimate against what this run measured
        from tfuse.estimate import DecoderShape, solve_seconds, statistics_bytes

        shape = DecoderShape.from_config(CASES[args.case](0)[0].config.to_dict())
        predicted = solve_seconds(shape, lap_seconds())["total"]
        measured = min(runs["fuse"], key=lambda f: f[0])[1]["transport"] if "fuse" in runs else None
        stats_mb = statistics_bytes(shape)["total"] / 1e6
        print(f"  estimate     statistics {stats_mb:.0f} MB (exact, tests/test_decoder.py); transport {predicted:.2f} s "
              + (f"estimated against {measured:.2f} s measured" if measured is not None else "estimated (no fuse run)"))
        summary.update({"estimate_statistics_mb": round(stats_mb, 1), "estimate_transport_s": round(predicted, 3),
                        "transport_s": None if measured is None else round(measured, 3)})
    if "sweep" in only:
        began = time.perf_counter()
        uncached = sweep_seconds(args.case, args.samples, settings, cached=False, device=device)
        cached = sweep_seconds(args.case, args.samples, settings, cached=True, device=device)
        fuse_s = summary["fuse_s"]
        print(f"  reg sweep    {uncached:8.2f} s as {len(SWEEP_REGS)} fuses, {cached:.2f} s through the statistics cache "
              + (f"({cached / fuse_s:.2f} x one fuse)" if fuse_s else "(x one fuse: with --only fuse,sweep)"))
        summary.update({"sweep8_uncached_s": round(uncached, 3), "sweep8_cached_s": round(cached, 3),
                        "sweep8_cached_per_fuse": round(cached / fuse_s, 3) if fuse_s else None})
        print(f"  [sweep: {time.perf_counter() - began:.0f} s]")
    print(json.dumps(summary))


def lap_seconds() -> Callable[[int], float]:
    """This machine's exact-OT time for an n x n cost (linear assignment), fitted as ``c n^p`` to
    measured sizes 128 .. 1024 (best of 3 each)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    sizes, times = [128, 256, 512, 1024], []
    rng = np.random.default_rng(0)
    for n in sizes:
        cost = rng.random((n, n))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            linear_sum_assignment(cost)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    p, log_c = np.polyfit(np.log(sizes), np.log(times), 1)
    print(f"exact OT (linear assignment) on this machine: {', '.join(f'{n}: {t * 1e3:.1f} ms' for n, t in zip(sizes, times))}; "
          f"fit {np.exp(log_c):.3g} n^{p:.2f} s")
    return lambda n: float(np.exp(log_c) * n ** p)


GPU_GB = 80  # the GPU --estimate says a streamed run fits, or not


def estimate(names: list[str], samples: int, large: int) -> None:
    """Estimates for each shape at ``samples`` calibration sequences and ``large`` repair samples of
    the longest context used here (2,048 tokens for the presets)."""
    from tfuse.estimate import repair_bytes, shape_of, solve_seconds, statistics_bytes, stream_bytes, weights_bytes

    seconds = lap_seconds()
    out = {}
    for name in names:
        shape = shape_of(name)
        stats, weights = statistics_bytes(shape), weights_bytes(shape)
        repair = repair_bytes(shape, 2, samples, 2048)
        solve = solve_seconds(shape, seconds)
        print(f"{name}: {shape.parameters() / 1e9:.2f} B parameters")
        print("  statistics   " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in stats.items()))
        print(f"  weights      {weights['fuse'] / 1e9:.1f} GB while fusing, {weights['repair'] / 1e9:.1f} GB with the repair (float32)")
        print(f"  repair       normal equations {repair['normal_equations'] / 1e9:.2f} GB, the fused model's block inputs of "
              f"{samples} sequences x 2,048 tokens {repair['block_inputs'] / 1e9:.1f} GB, held {repair['held'] / 1e9:.2f} GB "
              f"in memory; {repair['spill'] / 1e9:.1f} GB spilled to disk")
        print("  solve        " + ", ".join(f"{k} {v:.0f} s" for k, v in solve.items()) + " (exact OT, this machine)")
        streamed = {f"stream_{kind}_{dtype}_gb": round(stream_bytes(shape, 2, samples, 2048, bytes_per=size, repair=kind == "repair",
                                                                    process=False)["total"] / 1e9, 1)
                    for kind in ("fuse", "repair") for dtype, size in (("float32", 4), ("bfloat16", 2))}
        print("  streamed     peak (fusion.stream, every hidden state in memory, no process): " + ", ".join(
            f"{k[7:-3].replace('_', ' ')} {v:.1f} GB" for k, v in streamed.items())
              + f"; with lstsq in bfloat16 it {'fits' if streamed['stream_repair_bfloat16_gb'] <= GPU_GB else 'does not fit'} "
              f"one {GPU_GB} GB GPU")
        out[name] = {"parameters": shape.parameters(), "statistics_gb": round(stats["total"] / 1e9, 2),
                     "weights_fuse_gb": round(weights["fuse"] / 1e9, 1), "weights_repair_gb": round(weights["repair"] / 1e9, 1),
                     "repair_gb": round(repair["total"] / 1e9, 1), "solve_s": round(solve["total"], 1), **streamed}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
