"""Partitions of the training data among recipe parents: each kind's rule, exact or seeded, for N
parents; IID keeps today's parents; bad values are one-line errors."""
import pytest
import torch
from omegaconf import OmegaConf

from tfuse.errors import TfuseError
from tfuse.parents import recipe, recipe_dir
from tfuse.partition import Partition, describe, own_classes, shards

LABELS = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]


def counts(parts, labels=LABELS):
    return torch.stack([torch.bincount(labels[p], minlength=10) for p in parts])


def check_cover(parts, n=1000):
    joined = torch.cat(parts)
    assert len(joined) == n and torch.equal(joined.sort().values, torch.arange(n)), "disjoint and covering"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_skew_gives_each_parent_fraction_of_its_classes_and_an_equal_share_of_the_rest(n):
    parts = shards(Partition("skew", seed=3, fraction=0.9), LABELS, 1000, n)
    check_cover(parts)
    table = counts(parts)
    groups = [g.tolist() for g in torch.arange(10).tensor_split(n)]
    for i, group in enumerate(groups):
        for c in range(10):
            if c in group:
                assert table[i, c] == 90
            else:
                assert abs(int(table[i, c]) - 10 / (n - 1)) < 1  # the 10 left over, shared equally
    if n == 2:  # OTFusion's split: 90% of 0-4 and 10% of 5-9
        assert table[0].tolist() == [90] * 5 + [10] * 5


def test_classes_are_disjoint_and_sizes_exact():
    parts = shards(Partition("classes"), LABELS, 1000, 3)
    check_cover(parts)
    table = counts(parts)
    assert table[0].tolist() == [100] * 4 + [0] * 6 and table[2].tolist() == [0] * 7 + [100] * 3
    sized = shards(Partition("sizes", seed=1, fractions=(0.1, 0.9)), LABELS, 1000, 2)
    check_cover(sized)
    assert [len(p) for p in sized] == [100, 900]
    assert [len(p) for p in shards(Partition("sizes"), LABELS, 1000, 3)] == [334, 333, 333]


def test_dirichlet_is_seeded_reproducible_and_skewed():
    a = shards(Partition("dirichlet", seed=7, alpha=0.5), LABELS, 1000, 4)
    b = shards(Partition("dirichlet", seed=7, alpha=0.5), LABELS, 1000, 4)
    c = shards(Partition("dirichlet", seed=8, alpha=0.5), LABELS, 1000, 4)
    check_cover(a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    severe = counts(shards(Partition("dirichlet", seed=7, alpha=0.1), LABELS, 1000, 2)).float()
    mild = counts(shards(Partition("dirichlet", seed=7, alpha=100.0), LABELS, 1000, 2)).float()
    assert (severe.max(0).values / 100).mean() > 0.8 > (mild.max(0).values / 100).mean()  # one parent holds most


def test_iid_gives_every_parent_the_whole_split_and_keeps_the_parents_cache_key():
    parts = shards(Partition(), LABELS, 1000, 3)
    assert all(torch.equal(p, torch.arange(1000)) for p in parts)
    base = {"model": {"family": "hf_vit"}, "data": {"name": "digits"}, "train": {"epochs": 1}, "cache_dir": "c"}
    old = OmegaConf.create(base)  # a config from before partitions existed
    iid = OmegaConf.create({**base, "partition": {"kind": "iid", "seed": 5}})
    assert recipe(iid, 3, (1, 2)) == recipe(old, 3) == {**{k: base[k] for k in ("model", "data", "train")}, "seed": 3}
    assert recipe_dir(iid, 3, (1, 2)) == recipe_dir(old, 3)
    skew = OmegaConf.create({**base, "partition": {"kind": "skew", "seed": 0, "fraction": 0.9}})
    keys = {recipe_dir(skew, 3, (i, 2)) for i in range(2)} | {recipe_dir(OmegaConf.merge(skew, {"partition": {"seed": 1}}), 3, (0, 2))}
    assert len(keys) == 3 and recipe_dir(old, 3) not in keys  # the shard and the partition's seed are in the key


def test_description_and_own_classes():
    part = Partition("skew", fraction=0.9)
    parts = shards(part, LABELS, 1000, 2)
    info = describe(part, parts, LABELS, 10, 64)
    assert info["kind"] == "skew" and info["fraction"] == 0.9 and info["seed"] == 0 and "alpha" not in info
    assert [s["size"] for s in info["shards"]] == [500, 500] and info["shards"][1]["classes"][9] == 90
    assert own_classes(info, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert own_classes(describe(Partition(), shards(Partition(), LABELS, 1000, 2), LABELS, 10, 64), 2) is None
    sized = Partition("sizes", fractions=(0.5, 0.5))
    assert own_classes(describe(sized, shards(sized, LABELS, 1000, 2), LABELS, 10, 64), 2) is None  # random shards own no class
    small = describe(Partition(), shards(Partition(), LABELS, 1000, 2), LABELS, 10, 4096)  # IID trains on a short split as before
    assert [s["size"] for s in small["shards"]] == [1000, 1000]


@pytest.mark.parametrize("make, message", [
    (lambda: Partition("dirichlet", alpha=-0.5), "partition.alpha=-0.5 must be positive"),
    (lambda: Partition("skew", fraction=1.5), "partition.fraction=1.5 must lie in (0, 1]"),
    (lambda: Partition("skew", fraction=0.0), "partition.fraction=0.0 must lie in (0, 1]"),
    (lambda: Partition("sizes", fractions=(0.5, 0.6)), "must sum to 1"),
    (lambda: Partition("shuffled"), "partition.kind='shuffled' is not known"),
    (lambda: Partition.from_config({"kind": "skew", "fracton": 0.9}), "unknown partition setting(s) fracton"),
    (lambda: shards(Partition("classes"), LABELS, 1000, 11), "deals 10 classes to 11 parents"),
    (lambda: shards(Partition("sizes", fractions=(0.5, 0.5)), LABELS, 1000, 3), "has 2 entries but there are 3"),
    (lambda: shards(Partition("skew"), None, 1000, 2), "has no class labels"),
    (lambda: describe(Partition("sizes", fractions=(0.05, 0.95)), shards(Partition("sizes", fractions=(0.05, 0.95)),
                                                                         LABELS, 1000, 2), LABELS, 10, 64),
     "parent 0's shard holds 50 training examples, fewer than one batch"),
    (lambda: describe(Partition("classes"), [torch.arange(500), torch.arange(0)], LABELS, 10, 64),
     "parent 1's shard holds 0 training examples"),  # an empty (class-less) shard
])
def test_bad_partitions_are_one_line_errors(make, message):
    with pytest.raises(TfuseError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)
