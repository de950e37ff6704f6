"""fusion.learn_steps: maps refined on the interpolated model's loss lower the midpoint's
validation loss between two independently trained models, and never raise it: worse maps are
not kept."""
import pytest
import torch
import torch.nn.functional as F

from conftest import batches_of, tiny_vit
from tfuse.arch import family, folded
from tfuse.fusion.learned import Objective
from tfuse.fusion.methods.ot import OTSettings, ot_fuse

from test_interpolation import Labelled


@pytest.fixture(scope="module")
def pair():
    task = Labelled()
    return task, [task.fit(tiny_vit(seed)) for seed in (0, 1)]


def objective(task, sign: float = 1.0) -> Objective:
    def loss(model, batch):
        return sign * F.cross_entropy(model(pixel_values=batch["x"]).logits, batch["y"])

    def endless():
        while True:
            yield {"x": task.x, "y": task.y}

    return Objective(endless, loss, lambda model: task.evaluate(model, "val")["loss"])


def fuse(models, task, steps: int, lr: float, sign: float = 1.0, maps: str = "permutation"):
    graph = family("hf_vit").graph(models[0])
    if maps == "orthogonal":
        models, graphs = map(list, zip(*(folded(m) for m in models)))
        graph = graphs[0]
    st = OTSettings(tokens="all", solver="emd", residual="global", qk="head_aware", samples=64, batch_size=16,
                    learn_steps=steps, learn_lr=lr, learn_eval=10, maps=maps)
    return ot_fuse(models, graph, st, 0, batches_of(task.x, 16), lambda b: b, objective=objective(task, sign))


@pytest.mark.parametrize("maps", ["permutation", "orthogonal"])
def test_learned_maps_lower_the_midpoints_validation_loss(pair, maps):
    task, models = pair
    outcome = fuse(models, task, steps=30, lr=0.5, maps=maps)
    learned = outcome.info["learned"][0]
    start, *after = learned["val_loss"]
    assert learned["kept"] == "learned" and min(after) < start - 0.05
    assert learned["passes"] == {"forward": 30, "backward": 30, "validation": 4}
    assert ("stream" in learned["learned_spaces"]) and any("mlp" in s for s in learned["learned_spaces"])
    with torch.no_grad():  # learned maps are symmetries still: the aligned parent computes the parent's outputs
        aligned = outcome.aligned()[1](pixel_values=task.x).logits
        torch.testing.assert_close(aligned, models[1](pixel_values=task.x).logits, atol=1e-3, rtol=1e-3)


def test_maps_that_raise_the_validation_loss_are_not_kept(pair):
    task, models = pair
    start = fuse(models, task, steps=0, lr=0.05)
    worse = fuse(models, task, steps=20, lr=0.5, sign=-1.0)  # trained to raise the loss
    learned = worse.info["learned"][0]
    assert learned["kept"] == "start" and max(learned["val_loss"][1:]) > learned["val_loss"][0]
    for (name, w), v in zip(worse.model.named_parameters(), start.model.parameters()):
        torch.testing.assert_close(w, v, msg=name)


def test_the_image_tasks_own_loss_runs_on_a_model_holding_stand_ins():
    """``tfuse fuse +experiment=vit_mnist fusion.learn_steps=N`` trains on the image task's loss,
    which reads the model while its parameters are swapped for the maps' differentiable images."""
    from tfuse.fusion.engine import parameters
    from tfuse.fusion.learned import _holding
    from tfuse.tasks.image_classification import logits

    model = tiny_vit(0)
    side = model.config.image_size
    x = torch.randn(3, model.config.num_channels, side, side, generator=torch.Generator().manual_seed(0))
    want = logits(model, x)
    stand_ins = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    with _holding(model, stand_ins) as held:
        got = logits(held, x)
        got.sum().backward()
    torch.testing.assert_close(got, want)
    assert all(t.grad is not None for t in stand_ins.values()) and set(parameters(model)) == set(stand_ins)


def test_weight_matchings_permutations_are_refined_alike(pair):
    """A refinement stage after weight matching too: its matched permutations are the start, and
    the kept maps are still symmetries of the parent."""
    from tfuse.fusion.methods import Calibration
    from tfuse.fusion.methods.weight_matching import WeightMatching, WeightMatchingSettings

    task, models = pair
    graph = family("hf_vit").graph(models[0])
    calibration = Calibration(batches_of(task.x, 16), lambda b: b, objective=objective(task))
    matched = WeightMatching().fuse(models, graph, 0, calibration, WeightMatchingSettings())
    outcome = WeightMatching().fuse(models, graph, 0, calibration,
                                    WeightMatchingSettings(learn_steps=30, learn_lr=0.5, learn_eval=10))
    learned = outcome.info["learned"][0]
    start, *after = learned["val_loss"]
    assert start == pytest.approx(task.evaluate(matched.model, "val")["loss"], rel=1e-5)
    assert learned["kept"] == "learned" and min(after) < start - 0.05 and "stream" in learned["learned_spaces"]
    assert task.evaluate(outcome.model, "val")["loss"] == pytest.approx(min(after), rel=1e-5)
    with torch.no_grad():
        aligned = outcome.aligned()[1](pixel_values=task.x).logits
        torch.testing.assert_close(aligned, models[1](pixel_values=task.x).logits, atol=1e-3, rtol=1e-3)
