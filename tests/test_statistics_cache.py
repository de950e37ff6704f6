"""The statistics cache: a sweep over post-statistics knobs streams the data once, gives exactly
the uncached result, and never trusts a corrupt or foreign entry."""
from pathlib import Path

import pytest
import torch

from tfuse.arch import hf_vit
from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from conftest import batches_of, tiny_vit

identity = lambda batch: batch  # noqa: E731
BASE = dict(tokens="all", samples=48, batch_size=16)


@pytest.fixture
def models():
    return [tiny_vit(0), tiny_vit(1)]


def fuse(models, images, store, **settings):
    settings = OTSettings(**{**BASE, **settings})
    return ot_fuse(models, hf_vit.graph(models[1]), settings, 1, batches_of(images, 16), identity, cache=store)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(parameters(a.model).values(), parameters(b.model).values()))


def test_a_reg_sweep_streams_once_and_equals_the_uncached_fuses(models, images, tmp_path: Path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    for i, reg in enumerate([0.02, 0.05, 0.1]):
        cached = fuse(models, images, cache, reg=reg)
        assert cached.info["statistics"] == ["computed" if i == 0 else "cached"]
        assert same(cached, fuse(models, images, None, reg=reg))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_three_parents_share_the_reference_moments_and_come_back_alike(images, tmp_path: Path):
    three = [tiny_vit(0), tiny_vit(1), tiny_vit(2)]
    cache = StatisticsCache(tmp_path, {"data": "images"})
    first = fuse(three, images, cache, iterations=2, center=True)
    again = fuse(three, images, cache, iterations=2, center=True)
    assert first.info["statistics"] == ["computed", "computed"] and again.info["statistics"] == ["cached", "cached"]
    assert same(again, fuse(three, images, None, iterations=2, center=True))


@pytest.mark.parametrize(("change", "shared"), [
    ({"solver": "emd"}, True),
    ({"metric": "cosine", "normalize_cost": "median"}, True),
    ({"residual": "no_resid"}, True),  # the same probes as mean
    ({"residual": "weighted_scalar"}, False),  # magnitudes: more probes
    ({"qk": "eq_t_map"}, False),
    ({"samples": 32}, False),
    ({"seed": 1}, False),
    ({"tokens": "cls"}, False),
    ({"center": True}, False),  # plain sums kept
])
def test_the_key_holds_what_the_statistics_depend_on(models, images, tmp_path: Path, change: dict, shared: bool):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    fuse(models, images, cache, residual="mean")
    again = fuse(models, images, cache, **{"residual": "mean", **change})
    assert again.info["statistics"] == ["cached" if shared else "computed"]


def test_other_weights_or_data_are_other_entries(models, images, tmp_path: Path):
    fuse(models, images, StatisticsCache(tmp_path, {"data": "images"}))
    assert fuse(models, images, StatisticsCache(tmp_path, {"data": "other"})).info["statistics"] == ["computed"]
    other = [tiny_vit(2), models[1]]
    assert fuse(other, images, StatisticsCache(tmp_path, {"data": "images"})).info["statistics"] == ["computed"]


def test_a_corrupt_or_foreign_entry_is_recomputed(models, images, tmp_path: Path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    first = fuse(models, images, cache, reg=0.05)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    again = fuse(models, images, cache, reg=0.05)
    assert again.info["statistics"] == ["computed"] and same(again, first)
    foreign = StatisticsCache(tmp_path / "b", {"data": "images"})
    fuse(models, images, foreign, samples=32)  # another key's entry, renamed to this key's name
    (theirs,) = (tmp_path / "b").glob("*.safetensors")
    theirs.replace(entry)
    assert fuse(models, images, cache, reg=0.05).info["statistics"] == ["computed"]
    assert fuse(models, images, cache, reg=0.05).info["statistics"] == ["cached"]  # rewritten, now trusted


def test_cache_false_always_streams(models, images, tmp_path: Path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    for _ in range(2):
        assert fuse(models, images, cache, cache=False).info["statistics"] == ["computed"]
    assert not list(tmp_path.glob("*.safetensors"))


REPAIR = dict(repair="lstsq", repair_samples=48, cache_targets=True)


def repaired(models, images, store, **settings):
    settings = OTSettings(**{**BASE, **REPAIR, **settings})
    return ot_fuse(models, hf_vit.graph(models[1]), settings, 1, batches_of(images, 16), identity, cache=store)


@pytest.mark.parametrize("repair", ["lstsq", "rescale"])
def test_a_ridge_sweep_computes_the_repair_targets_once_and_equals_the_uncached_repairs(models, images, tmp_path, repair):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    for i, ridge in enumerate([1e-3, 1e-2, 0.0]):
        cached = repaired(models, images, cache, solver="emd", repair=repair, repair_ridge=ridge)
        assert cached.info["repair_targets"] == ("computed" if i == 0 else "cached")
        plain = repaired(models, images, None, solver="emd", repair=repair, repair_ridge=ridge)
        assert plain.info["repair_targets"] == "computed" and same(cached, plain)
        assert [(f.before, f.after) for f in cached.repair] == [(f.before, f.after) for f in plain.repair]
    assert len(list((tmp_path / "targets").iterdir())) == 1


@pytest.mark.parametrize("change", [{"reg": 0.05}, {"repair_samples": 32}, {"alpha": [0.3, 0.7]}, {"repair": "rescale"}])
def test_other_aligned_parents_or_repair_data_are_other_target_entries(models, images, tmp_path, change):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    repaired(models, images, cache, reg=0.1)
    assert repaired(models, images, cache, **{"reg": 0.1, **change}).info["repair_targets"] == "computed"
    assert len(list((tmp_path / "targets").iterdir())) == 2


def test_a_corrupt_or_foreign_target_entry_is_recomputed(models, images, tmp_path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    first = repaired(models, images, cache, solver="emd")
    (entry,) = (tmp_path / "targets").iterdir()
    stage = entry / "stage-3.safetensors"
    stage.write_bytes(stage.read_bytes()[:-64])  # truncated
    again = repaired(models, images, cache, solver="emd")
    assert again.info["repair_targets"] == "computed" and same(again, first)
    assert repaired(models, images, cache, solver="emd").info["repair_targets"] == "cached"
    (entry / "stage-0.safetensors").unlink()  # incomplete
    assert repaired(models, images, cache, solver="emd").info["repair_targets"] == "computed"
    layout = entry / "layout.json"
    layout.write_text(layout.read_text().replace('"batches": 3', '"batches": 2'))  # another key's layout
    assert repaired(models, images, cache, solver="emd").info["repair_targets"] == "computed"
    assert same(repaired(models, images, cache, solver="emd"), first)


def test_targets_are_kept_only_when_asked(models, images, tmp_path):
    cache = StatisticsCache(tmp_path, {"data": "images"})
    for settings in ({"cache_targets": False}, {"cache": False}):
        assert repaired(models, images, cache, **settings).info["repair_targets"] == "computed"
    assert not (tmp_path / "targets").exists() or not list((tmp_path / "targets").iterdir())
