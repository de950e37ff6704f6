"""Parents that know different things: per-sample repair targets, weights for unequal parents,
the finetune within a data budget and its scratch control, end to end from the shell."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tfuse.arch import hf_vit
from tfuse.errors import TfuseError
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.repair import Rows, sample_weights
from tfuse.symmetry import permuted_copy
from conftest import fuse_in_process, logits, tfuse, tiny_vit
from test_repair import trained_like

HARD = dict(solver="emd", residual="global", qk="head_aware", tokens="all")


def labelled(x: torch.Tensor, size: int):
    labels = torch.arange(len(x)) % 10
    return lambda: ({"pixel_values": x[i:i + size], "labels": labels[i:i + size]} for i in range(0, len(x), size))


def competence(model, batch):
    probs = F.softmax(logits(model, batch["pixel_values"]), -1)
    true = probs.gather(1, batch["labels"][:, None])[:, 0] if "labels" in batch else None
    return true, probs.max(-1).values


@pytest.mark.parametrize("kind", ["label", "confidence"])
def test_per_sample_weights_sum_to_one_and_follow_the_competent_parent(kind, images):
    a, b = trained_like(tiny_vit(0), 1), trained_like(tiny_vit(1), 2)
    batches = list(labelled(images, 16)())
    weights = sample_weights([a, b], [0.3, 0.7], batches, kind, competence)
    for w, batch in zip(weights, batches):
        assert w.shape == (len(batch["labels"]), 2) and (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(len(w)))
        score = torch.stack([competence(m, batch)[0 if kind == "label" else 1] for m in (a, b)], 1) * torch.tensor([0.3, 0.7])
        torch.testing.assert_close(w, score / score.sum(1, keepdim=True))  # alpha x competence, normalised
    with pytest.raises(TfuseError, match="needs the task's per-sample predictions"):
        sample_weights([a, b], [0.5, 0.5], batches, kind, None)
    with pytest.raises(TfuseError, match="needs labelled calibration samples"):
        sample_weights([a, b], [0.5, 0.5], [{"pixel_values": images[:4]}], "label", competence)


@pytest.mark.parametrize(("kind", "anchor"), [("label", 0), ("confidence", 0), ("label", 1)])
def test_a_parent_at_full_weight_on_every_sample_gives_back_its_aligned_model(kind, anchor, images):
    """alpha = [1, 0]: every sample's target is parent 0's aligned output, whatever the other does;
    the weights follow the parents, whichever is the anchor (fusion.anchor=best composes)."""
    model = trained_like(tiny_vit(), 3)
    other = trained_like(tiny_vit(4), 5)
    settings = OTSettings(**HARD, repair="lstsq", repair_ridge=0.0, repair_targets=kind, alpha=[1.0, 0.0])
    graph = hf_vit.graph(model)
    outcome = ot_fuse([model, other], graph, settings, anchor, labelled(images, 16),
                      lambda b: {"pixel_values": b["pixel_values"]}, competence=competence)
    torch.testing.assert_close(logits(outcome.model, images), logits(model, images), atol=1e-4, rtol=1e-4)
    mean = ot_fuse([model, other], graph, OTSettings(**HARD, repair="lstsq", repair_ridge=0.0), 0, labelled(images, 16),
                   lambda b: {"pixel_values": b["pixel_values"]})
    assert not torch.allclose(logits(mean.model, images), logits(model, images), atol=1e-2)  # the plain mean does not


def test_label_targets_with_an_exact_copy_return_the_model(images):
    """A model and its permuted copy agree on every sample: any per-sample weighting is exact."""
    model = trained_like(tiny_vit(), 3)
    graph = hf_vit.graph(model)
    copy = permuted_copy(model, graph, seed=5)
    settings = OTSettings(**HARD, repair="lstsq", repair_ridge=1e-3, repair_targets="label")
    outcome = ot_fuse([copy, model], graph, settings, 1, labelled(images, 16), lambda b: {"pixel_values": b["pixel_values"]},
                      competence=competence)
    torch.testing.assert_close(logits(outcome.model, images), logits(model, images), atol=1e-4, rtol=1e-4)


def test_rows_spread_per_example_values_over_the_kept_tokens(images):
    settings = OTSettings(**HARD)
    batches = [{"pixel_values": images[:3]}]
    rows = Rows(hf_vit.graph(tiny_vit()), settings, batches)
    x = torch.randn(3, 5, 7)
    values = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    spread = rows.per_row(0, x, values)
    assert spread.shape == (15, 2) and torch.equal(spread[5:10], values[1].expand(5, 2))
    assert torch.equal(rows.per_row(0, torch.randn(3, 7), values), values)  # pooled: one row per example


def test_rescale_refuses_per_sample_targets():
    with pytest.raises(TfuseError, match="needs fusion.repair=lstsq"):
        OTSettings(repair="rescale", repair_targets="label")
    with pytest.raises(TfuseError, match="fusion.alpha='sized'"):
        OTSettings(alpha="sized")


def test_the_finetune_budget_is_the_repair_calibration_set():
    """finetune.max_samples=N trains on the N images the repair calibrates on (same seed)."""
    from omegaconf import OmegaConf

    from tfuse.data.images import load_images
    from tfuse.pipeline.finetune import finetune_task
    from tfuse.tasks.image_classification import ImageClassificationTask

    task = ImageClassificationTask(load_images("digits"))
    cfg = OmegaConf.create({"seed": 3, "finetune": {"max_samples": 100}})
    budget = finetune_task(task, cfg)
    calibration = torch.cat([b["pixel_values"] for b in task.calibration_batches(100, 32, 3)])
    assert budget.train_size == 100 and budget.data.test is task.data.test
    held = {tuple(x.flatten().tolist()) for x in budget.data.train[0]}
    assert held == {tuple(x.flatten().tolist()) for x in calibration}
    assert finetune_task(task, OmegaConf.create({"seed": 3, "finetune": {"max_samples": None}})) is task
    with pytest.raises(TfuseError, match="finetune.max_samples=0 must be a positive number"):
        finetune_task(task, OmegaConf.create({"seed": 3, "finetune": {"max_samples": 0}}))


def test_alpha_shard_weighs_parents_by_their_shards_and_needs_recipe_parents():
    from types import SimpleNamespace

    from tfuse.pipeline.stages import resolve_alpha

    setup = SimpleNamespace(settings=OTSettings(alpha="shard"), models=[None, None], task=None,
                            partition={"shards": [{"size": 300}, {"size": 900}]})
    assert resolve_alpha(setup, {}) == pytest.approx([0.25, 0.75])
    with pytest.raises(TfuseError, match="parents=\\[...\\] have none"):
        resolve_alpha(SimpleNamespace(**{**vars(setup), "partition": None}), {})


# --- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("noniid")


@pytest.fixture(scope="module")
def skew_run(workdir: Path) -> Path:
    out = workdir / "skew"
    proc = tfuse(
        "fuse", "+experiment=vit_digits_tiny", "partition=skew", "fusion.repair=lstsq", "fusion.repair_targets=label",
        "fusion.alpha=val", "finetune.controls=[parents,scratch]", "finetune.max_samples=300", "finetune.eval_every=0",
        f"hydra.run.dir={out}", f"cache_dir={workdir / 'parents'}", f"statistics_dir={workdir / 'stats'}", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_a_skewed_run_records_its_shards_classes_and_controls(skew_run: Path, workdir: Path):
    results = json.loads((skew_run / "results.json").read_text())
    part = results["partition"]
    assert part["kind"] == "skew" and part["seed"] == 0 and part["fraction"] == 0.9
    sizes = [s["size"] for s in part["shards"]]
    first, second = (torch.tensor(s["classes"]) for s in part["shards"])
    assert (first[:5] > 4 * first[5:].max()).all() and (second[5:] > 4 * second[:5].max()).all()
    from tfuse.data.images import load_images

    assert sum(sizes) == len(load_images("digits").train[1])  # the shards cover the training split
    # per-class scores, own classes and the rest, for every one-shot model
    one_shot = results["one_shot"]
    assert {"ensemble_weighted", "ot", "vanilla"} <= set(one_shot) and set(results["per_class"]) == set(one_shot)
    labels = torch.tensor(results["test_labels"])
    for name, pred in results["test_predictions"].items():
        assert (torch.tensor(pred) == labels).float().mean().item() == pytest.approx(one_shot[name]["accuracy"])
    assert results["own_classes"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    p0 = results["by_shard"]["parent_0"]
    assert p0[0]["own"] > p0[0]["rest"] + 0.2  # parent 0 knows its own digits
    # alpha=val: weights in proportion to the parents' validation accuracy
    val = [results["one_shot_val"][f"parent_{i}"]["accuracy"] for i in range(2)]
    assert results["alpha"] == pytest.approx([v / sum(val) for v in val]) and results["settings"]["alpha"] == "val"
    assert results["settings"]["repair_targets"] == "label"
    assert set(results["finetuned"]) == {"ot", "vanilla", "parent_0", "parent_1", "scratch"}
    assert results["finetuned"]["scratch"]["accuracy"] > 0.5
    for name, pred in results["test_predictions_finetuned"].items():  # controls too: paired tests after the finetune
        assert (torch.tensor(pred) == labels).float().mean().item() == pytest.approx(results["finetuned"][name]["accuracy"])
    assert set(results["by_shard_finetuned"]) == set(results["finetuned"])
    card = (skew_run / "fused" / "README.md").read_text()
    assert "partition: kind skew, seed 0, fraction 0.9" in card and f"| 0 | {sizes[0]} |" in card
    assert "own 0" in (skew_run / "stdout.txt").read_text()  # the printed table's non-IID columns


def test_the_partition_seed_and_shards_key_the_parent_cache(skew_run: Path, workdir: Path):
    recipes = [json.loads(p.read_text()) for p in (workdir / "parents").glob("*/recipe.json")]
    assert sorted(r["partition"]["shard"] for r in recipes) == [[0, 2], [1, 2]]
    assert all(r["partition"]["kind"] == "skew" for r in recipes)


def test_a_bad_partition_from_the_shell_ends_with_one_line_and_exit_2(workdir: Path):
    """Every partition error takes this path (test_partition.py checks each message): tfuse
    train's from the shell, tfuse fuse's in-process (its conversion: test_cli_errors.py)."""
    proc = tfuse("train", "+experiment=vit_digits_tiny", "partition=skew", f"hydra.run.dir={workdir / 'bad'}", cwd=workdir)
    assert proc.returncode == 2 and "tfuse train trains one parent on the whole training split" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(TfuseError, match="deals 10 classes to 11 parents"):
        fuse_in_process(workdir / "bad_fuse", "+experiment=vit_digits_tiny", "partition=classes", "n_parents=11",
                        f"cache_dir={workdir / 'bad_parents'}", f"statistics_dir={workdir / 'stats'}")
    assert not (workdir / "bad_parents").exists()  # refused before any parent is trained
