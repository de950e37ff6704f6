"""The pipeline on a CUDA GPU against the same run on the CPU: statistics, transport maps, fused
and repaired models, the statistics cache, and `tfuse fuse device=cuda` end to end. Every test is
skipped without a GPU (scripts/gpu_check.sh runs them where there is one)."""
import copy
import json
from pathlib import Path

import pytest
import torch

from tfuse.arch import hf_vit
from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods import METHODS, Calibration
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.methods.weight_matching import WeightMatchingSettings
from tfuse.fusion.plan import make_plan
from tfuse.fusion.statistics import collect_statistics
from conftest import batches_of, logits, tfuse, tiny_vit
from test_hetero import vit as hetero_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")

HARD = dict(solver="emd", tokens="all")
LOGITS_TOL = dict(rtol=1e-4, atol=1e-4)


def sinkhorn_tol(reg: float) -> dict:
    """A cost change d moves Sinkhorn's map by about d / reg relative. Float32 sums in another
    order move these normalised costs by about 2e-7 (the CPU's, batches reversed); 3e-5 / reg
    holds for changes up to 3e-6 (at reg 0.08: 4e-4; at 0.002: 1.5e-2); the logits move alike."""
    return dict(rtol=3e-5 / reg, atol=1e-6)


@pytest.fixture(autouse=True)
def plain_float32():
    """Both devices in plain float32: TF32, PyTorch's default for CUDA convolutions, rounds their
    inputs to 10 bits, and these tests compare tfuse's code, not TF32's rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def parents():
    return [tiny_vit(0), tiny_vit(1)]


def on(device: str, models):
    return [copy.deepcopy(m).to(device) for m in models]


def to_device(device: str):
    """Model inputs on ``device`` from the CPU batches that tasks give (``batches_of``)."""
    return lambda batch: {k: v.to(device) for k, v in batch.items()}


def fuse_on(device: str, models, settings: OTSettings, x: torch.Tensor, anchor: int = 0, cache=None):
    models = on(device, models)
    graph = hf_vit.graph(models[anchor])
    return ot_fuse(models, graph, settings, anchor, batches_of(x, 16), to_device(device), cache=cache)


def assert_on_gpu(outcome) -> None:
    assert all(p.is_cuda for p in outcome.model.parameters())
    assert all(t.is_cuda for maps in outcome.maps for t in maps.values())


def assert_same_function(gpu_model, cpu_model, x: torch.Tensor) -> None:
    torch.testing.assert_close(logits(gpu_model, x.cuda()).cpu(), logits(cpu_model, x), **LOGITS_TOL)


def test_statistics_agree_and_keep_their_precision(parents, images):
    """Cross-products float32, moments float64, on the GPU; equal to the CPU's up to rounding."""
    settings = OTSettings(tokens="random", token_count=3)  # drawn on the CPU: the same tokens
    plan = make_plan(hf_vit.graph(parents[0]), settings)
    out = {}
    for device in ("cpu", "cuda"):
        a, ref = on(device, parents)
        batches = (to_device(device)(b) for b in batches_of(images, 16)())
        out[device] = collect_statistics([a], ref, hf_vit.graph(ref), plan, batches, lambda b: b, settings)
    for space, gpu in out["cuda"].pairs[0].items():
        cpu = out["cpu"].pairs[0][space]
        assert gpu.cross.is_cuda and gpu.cross.dtype == torch.float32 and gpu.a.sumsq.dtype == torch.float64
        assert gpu.a.count == cpu.a.count
        torch.testing.assert_close(gpu.cross.cpu(), cpu.cross, rtol=1e-5, atol=1e-4, msg=space)
        torch.testing.assert_close(gpu.a.sumsq.cpu(), cpu.a.sumsq, rtol=1e-5, atol=1e-6, msg=space)


@pytest.mark.parametrize("settings", [
    dict(HARD),
    dict(solver="emd", tokens="random", token_count=3, residual="global", qk="head_aware"),
    dict(solver="emd", cost="weights", residual="global", qk="head_aware"),
], ids=["activations", "random-tokens-head-aware", "weights"])
def test_exact_maps_are_equal_and_the_fused_models_agree(parents, images, settings):
    cpu = fuse_on("cpu", parents, OTSettings(**settings), images)
    gpu = fuse_on("cuda", parents, OTSettings(**settings), images)
    assert_on_gpu(gpu)
    for space, t in cpu.maps[1].items():
        assert torch.equal(gpu.maps[1][space].cpu(), t), space
    assert_same_function(gpu.model, cpu.model, images)


def test_rectangular_exact_maps_are_equal(images):
    """Different widths: POT's network simplex (not a linear assignment) on the GPU's costs."""
    models = [hetero_vit(0, hidden=48, mlp=96, head_dim=12), hetero_vit(1, hidden=32, mlp=64, head_dim=8)]
    cpu = fuse_on("cpu", models, OTSettings(**HARD), images, anchor=1)
    gpu = fuse_on("cuda", models, OTSettings(**HARD), images, anchor=1)
    assert_on_gpu(gpu)
    for space, t in cpu.maps[0].items():
        assert torch.equal(gpu.maps[0][space].cpu(), t), space
    assert_same_function(gpu.model, cpu.model, images)


@pytest.mark.parametrize("reg", [0.08, 0.006, 0.002])  # plain float32, plain float64, POT's log domain
def test_sinkhorn_maps_agree_within_tolerance(parents, images, reg):
    settings = OTSettings(solver="sinkhorn", reg=reg, tokens="all", sinkhorn_iters=5000)
    cpu = fuse_on("cpu", parents, settings, images)
    gpu = fuse_on("cuda", parents, settings, images)
    assert_on_gpu(gpu)
    for space, t in cpu.maps[1].items():
        torch.testing.assert_close(gpu.maps[1][space].cpu(), t, **sinkhorn_tol(reg), msg=space)
    tol = max(3e-5 / reg, LOGITS_TOL["rtol"])
    torch.testing.assert_close(logits(gpu.model, images.cuda()).cpu(), logits(cpu.model, images), rtol=tol, atol=tol)


def test_weight_matching_finds_the_same_permutations(parents, images):
    method, settings = METHODS["weight_matching"], WeightMatchingSettings()
    out = {}
    for device in ("cpu", "cuda"):
        models = on(device, parents)
        out[device] = method.fuse(models, hf_vit.graph(models[0]), 0, Calibration(None, to_device(device)), settings)
    assert_on_gpu(out["cuda"])
    for space, t in out["cpu"].maps[1].items():
        assert torch.equal(out["cuda"].maps[1][space].cpu(), t), space
    assert_same_function(out["cuda"].model, out["cpu"].model, images)


@pytest.mark.parametrize("repair,tokens", [("lstsq", "all"), ("lstsq", "random"), ("rescale", "all")])
def test_repair_on_the_gpu_matches_the_cpu(parents, images, repair, tokens):
    """Within 1e-3 relative + 1e-4 absolute: the float32 sums of X^T X in another order move the
    refit weights by up to 2e-5 beyond 1e-3 relative on the CPU already (reversed batches)."""
    settings = OTSettings(**HARD, repair=repair, repair_tokens=tokens, token_count=3, repair_samples=48)
    cpu = fuse_on("cpu", parents, settings, images)
    gpu = fuse_on("cuda", parents, settings, images)
    assert_on_gpu(gpu)
    fused_cpu = parameters(cpu.model)
    for name, w in parameters(gpu.model).items():
        torch.testing.assert_close(w.cpu(), fused_cpu[name], rtol=1e-3, atol=1e-4, msg=name)
    assert [f.layer for f in gpu.repair] == [f.layer for f in cpu.repair]
    for g, c in zip(gpu.repair, cpu.repair):
        assert g.before == pytest.approx(c.before, rel=1e-4) and g.after == pytest.approx(c.after, rel=1e-2, abs=1e-7)
    assert_same_function(gpu.model, cpu.model, images)


def test_what_the_cpu_cached_is_loaded_onto_the_gpu(parents, images, tmp_path: Path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    settings = OTSettings(**HARD, repair="lstsq", repair_samples=48, cache_targets=True)
    cpu = fuse_on("cpu", parents, settings, images, cache=cache)
    gpu = fuse_on("cuda", parents, settings, images, cache=cache)
    assert cpu.info["statistics"] == ["computed"] and gpu.info["statistics"] == ["cached"]
    assert gpu.info["repair_targets"] == "cached"
    assert_on_gpu(gpu)
    for space, t in cpu.maps[1].items():
        assert torch.equal(gpu.maps[1][space].cpu(), t), space
    assert_same_function(gpu.model, cpu.model, images)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[dict, dict]:
    """vit_digits_tiny with lstsq repair on the GPU (parents trained there, finetuned there), then
    one-shot on the CPU from the same parents; each run its own statistics folder."""
    work = tmp_path_factory.mktemp("gpu_cli")
    common = ["+experiment=vit_digits_tiny", "fusion.repair=lstsq", "fusion.repair_samples=300"]
    proc = tfuse("fuse", *common, "device=cuda", f"hydra.run.dir={work / 'cuda'}", f"cache_dir={work / 'parents'}",
                 f"statistics_dir={work / 'statistics_cuda'}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = sorted(str(p) for p in (work / "parents").iterdir())
    proc = tfuse("fuse", *common, "device=cpu", f"parents=[{','.join(trained)}]", "finetune.steps=0",
                 f"hydra.run.dir={work / 'cpu'}", f"statistics_dir={work / 'statistics_cpu'}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(json.loads((work / device / "results.json").read_text()) for device in ("cuda", "cpu"))


def test_cli_fuses_on_the_gpu_end_to_end_like_the_cpu(cli_runs):
    gpu, cpu = cli_runs
    assert set(gpu["one_shot"]) == set(cpu["one_shot"]) == {"parent_0", "parent_1", "ensemble", "vanilla", "ot"}
    assert set(gpu["finetuned"]) == {"ot", "vanilla", "parent_0", "parent_1"}
    assert gpu["repair"]["ot"]["mean_error_after"] < gpu["repair"]["ot"]["mean_error_before"]
    for name, scores in gpu["one_shot"].items():  # 0.02: about 7 of the 360 test digits
        assert scores["accuracy"] == pytest.approx(cpu["one_shot"][name]["accuracy"], abs=0.02), name
    assert gpu["one_shot"]["ot"]["accuracy"] > 0.85
