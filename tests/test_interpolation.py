"""eval.interpolation: loss barriers between the anchor and each aligned parent. A model and a
permuted copy of itself, once aligned, have a flat curve (barrier 0); left unaligned they do not."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import batches_of, fuse_in_process, tiny_vit
from tfuse.arch import family
from tfuse.errors import TfuseError
from tfuse.fusion.methods import METHODS, Calibration
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.pipeline.interpolation import barriers, curves
from tfuse.symmetry import symmetric_copy


class Labelled:
    """A task stand-in: cross-entropy and accuracy of fixed random images against fixed labels."""

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    def fit(self, model, steps: int = 150):
        """The model trained to fit the labels: its interpolation with an unaligned copy of
        itself then rises above the endpoints."""
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(pixel_values=self.x).logits, self.y).backward()
            optimizer.step()
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model, split):
        logits = model.eval()(pixel_values=self.x).logits
        return {"accuracy": float((logits.argmax(-1) == self.y).float().mean()), "loss": float(F.cross_entropy(logits, self.y))}


def test_barriers_are_the_largest_excess_over_the_endpoints_line():
    lines = {"parent_1": {"loss": [1.0, 1.5, 1.4, 1.2]}, "parent_2": {"loss": [1.0, 0.9, 0.8, 0.6]}}
    got = barriers(lines, [0, 0.25, 0.5, 1], fused_loss=1.2, weights=[0.5, 0.25, 0.25], anchor=0)
    assert got["barrier"]["parent_1"] == pytest.approx(1.5 - 1.05)
    assert got["barrier_at_half"]["parent_1"] == pytest.approx(1.4 - 1.1)
    assert got["barrier"]["parent_2"] == pytest.approx(0.0)  # below the line: the endpoints bound it
    assert got["midpoint_barrier"] == pytest.approx(1.2 - (0.5 * 1.0 + 0.25 * 1.2 + 0.25 * 0.6))


def test_a_permuted_copy_has_no_barrier_once_aligned(images):
    task = Labelled()
    model = task.fit(tiny_vit(0))
    graph = family("hf_vit").graph(model)
    copy = symmetric_copy(model, graph, seed=1)
    st = OTSettings(tokens="all", solver="emd", residual="global", qk="head_aware", samples=48, batch_size=16)
    outcome = ot_fuse([model, copy], graph, st, 0, batches_of(images, 16), lambda b: b)
    lambdas = [0, 0.25, 0.5, 0.75, 1]
    aligned = curves(task, outcome.aligned(), 0, lambdas)["parent_1"]["loss"]
    assert max(aligned) - min(aligned) < 1e-5
    plain = curves(task, [model, copy], 0, lambdas)["parent_1"]["loss"]
    assert plain[0] == pytest.approx(plain[-1], abs=1e-5)  # the same function at both ends
    assert barriers({"parent_1": {"loss": plain}}, lambdas, 0.0, [0.5, 0.5], 0)["barrier"]["parent_1"] > 0.01


def test_every_method_gives_its_aligned_parents(images):
    """The endpoints: each method's aligned parent computes what the parent computes (hard maps)."""
    model = tiny_vit(0)
    graph = family("hf_vit").graph(model)
    copy = symmetric_copy(model, graph, seed=1)
    calibration = Calibration(None, lambda b: b)
    for name in ("vanilla", "weight_matching"):
        method = METHODS[name]
        outcome = method.fuse([model, copy], graph, 0, calibration, method.settings_class())
        parents = outcome.aligned()
        assert parents[0] is model
        with torch.no_grad():
            torch.testing.assert_close(parents[1](pixel_values=images).logits, copy(pixel_values=images).logits)


def test_a_run_records_curves_barriers_and_a_plot(tmp_path: Path):
    out = tmp_path / "run"
    results = fuse_in_process(out, "+experiment=vit_digits_tiny", f"cache_dir={tmp_path / 'parents'}",
                              f"statistics_dir={tmp_path / 'stats'}", "finetune.steps=0", "eval.interpolation=[0.5]")
    found = results["interpolation"]
    assert found["lambdas"] == [0.0, 0.5, 1.0] and set(found["methods"]) == {"vanilla", "ot"}
    one_shot = results["one_shot"]
    plain = found["methods"]["vanilla"]
    anchor, other = results["anchor"], 1 - results["anchor"]
    assert plain["curves"][f"parent_{other}"]["loss"][0] == pytest.approx(one_shot[f"parent_{anchor}"]["loss"], abs=1e-6)
    assert plain["curves"][f"parent_{other}"]["loss"][-1] == pytest.approx(one_shot[f"parent_{other}"]["loss"], abs=1e-6)
    # no repair: the vanilla fused model is the curve's midpoint (alpha 0.5)
    assert plain["curves"][f"parent_{other}"]["loss"][1] == pytest.approx(one_shot["vanilla"]["loss"], abs=1e-6)
    for method in found["methods"].values():
        assert method["barrier"][f"parent_{other}"] >= method["barrier_at_half"][f"parent_{other}"] - 1e-12
    assert found["methods"]["ot"]["barrier"][f"parent_{other}"] < plain["barrier"][f"parent_{other}"]
    assert json.loads((out / "results.json").read_text())["interpolation"] == found
    assert (out / "interpolation.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("bad", ["eval.interpolation=[1.5]", "eval.interpolation=[a]"])
def test_bad_lambdas_are_one_line(tmp_path: Path, bad: str):
    with pytest.raises(TfuseError, match="give lambdas between 0 and 1"):
        fuse_in_process(tmp_path / "bad", "+experiment=vit_digits_tiny", f"cache_dir={tmp_path / 'parents'}", bad)
