"""Transport solvers: the entropic map is the float64 Sinkhorn solution whichever precision and
domain ``solve`` picks for the cost's range (float32 plain, float64 plain, float64 log-domain)."""
import ot
import pytest
import torch

from tfuse.fusion.methods.ot import OTSettings
from tfuse.fusion.transport import solve


@pytest.mark.parametrize("reg", [0.5, 0.08, 0.01, 0.004])  # cost range / reg: 2, 12.5, 100, 250
def test_sinkhorn_map_matches_float64_log_domain_reference(reg):
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(48, 40, generator=gen, dtype=torch.float64)
    cost /= cost.max()
    plan = solve(cost, OTSettings(solver="sinkhorn", reg=reg, sinkhorn_iters=20_000), "test")
    a, b = torch.full((48,), 1 / 48, dtype=torch.float64), torch.full((40,), 1 / 40, dtype=torch.float64)
    ref = ot.sinkhorn(a, b, cost - cost.min(), reg, method="sinkhorn_log", numItermax=20_000, stopThr=1e-12)
    assert plan.dtype == torch.float64
    torch.testing.assert_close(plan.sum(1), a, rtol=1e-6, atol=0)
    torch.testing.assert_close(plan.sum(0), b, rtol=1e-5, atol=0)
    torch.testing.assert_close(plan, ref, rtol=0, atol=1e-5 * float(ref.max()))


def test_float32_cost_gives_the_same_map_as_float64():
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(64, 64, generator=gen, dtype=torch.float64)
    settings = OTSettings(solver="sinkhorn", reg=0.08)
    torch.testing.assert_close(solve(cost.float(), settings, "x"), solve(cost, settings, "x"), rtol=0, atol=1e-6 / 64)
