"""Activation costs from streamed sums equal the costs computed from the activations themselves."""
import itertools

import pytest
import torch

from tfuse.fusion.cost import activation_cost
from tfuse.fusion.methods.ot import OTSettings
from tfuse.fusion.statistics import Moments, PairStats


def streamed(a: torch.Tensor, b: torch.Tensor, settings: OTSettings, batch: int = 7) -> PairStats:
    sums = settings.center or settings.standardize
    ma, mb = Moments.zeros(a.shape[1], a.device, sums), Moments.zeros(b.shape[1], b.device, sums)
    cross = torch.zeros(a.shape[1], b.shape[1])
    for start in range(0, len(a), batch):
        x, y = a[start:start + batch], b[start:start + batch]
        ma.add(x)
        mb.add(y)
        cross.addmm_(x.T, y)
    return PairStats(ma, mb, cross)


def direct(a: torch.Tensor, b: torch.Tensor, settings: OTSettings) -> torch.Tensor:
    def transform(x):
        x = x.double()
        if settings.center:
            x = x - x.mean(0)
        if settings.standardize:
            x = x / x.std(0, unbiased=False)
        if settings.unit_norm or settings.metric == "cosine":
            x = x / x.norm(dim=0)
        return x.T

    xa, xb = transform(a), transform(b)
    if settings.metric == "cosine":
        return 1 - xa @ xb.T
    dist = torch.cdist(xa, xb)
    return dist**2 if settings.metric == "sqeuclidean" else dist


@pytest.mark.parametrize(
    "center,standardize,metric", itertools.product([False, True], [False, True], ["euclidean", "sqeuclidean", "cosine"])
)
def test_cost_from_sums_equals_cost_from_activations(center, standardize, metric):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(60, 12, generator=gen) * 2 + 1.5  # offset means: centring matters
    b = torch.randn(60, 9, generator=gen) + torch.linspace(-1, 1, 9)
    settings = OTSettings(center=center, standardize=standardize, metric=metric)
    stats = streamed(a, b, settings)
    assert (stats.a.sum is None) == (not (center or standardize))
    expected = direct(a, b, settings)
    torch.testing.assert_close(activation_cost(stats, settings).double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
