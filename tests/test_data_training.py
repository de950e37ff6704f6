"""Image data loading, the image classification task and the training loop."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from tfuse.data.images import load_images
from tfuse.errors import TfuseError
from tfuse.tasks.image_classification import ImageClassificationTask
from tfuse.training import epochs_to_steps, lr_factor, train


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", seed=0)


@pytest.fixture(scope="module")
def trained_vit(digits):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    # Patch 4 (4 tokens): with patch 2 this width-32 ViT only reaches about 45% in 150 steps.
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=8, patch_size=4, num_channels=1, num_labels=10,
    )
    model = ViTForImageClassification(config)
    task = ImageClassificationTask(digits)
    result = train(model, task, steps=150, lr=3e-3, batch_size=64, seed=0, description="test vit")
    return model, task, result


def _tiny_cifar(n: int, seed: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"class{i}" for i in range(10)])}
    )
    return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(n)]}, features=features)


def _sizes(data) -> tuple[int, int, int]:
    return len(data.train[1]), len(data.val[1]), len(data.test[1])


def test_mnist5k_splits_and_determinism():
    data = load_images("mnist5k", seed=0)
    assert sum(_sizes(data)) == 5000
    assert data.train[0].shape[1:] == (1, 28, 28) and data.train[0].dtype == torch.float32
    assert data.train[1].dtype == torch.int64
    assert (data.num_classes, data.channels, data.image_size) == (10, 1, 28)
    assert abs(float(data.train[0].mean())) < 1e-4 and abs(float(data.train[0].std()) - 1) < 1e-3
    again = load_images("mnist5k", seed=0)
    assert torch.equal(again.test[1], data.test[1]) and torch.equal(again.val[0], data.val[0])
    other = load_images("mnist5k", seed=1)
    assert not torch.equal(other.test[1], data.test[1])


def test_digits_and_max_train(digits):
    assert sum(_sizes(digits)) == 1797
    assert digits.train[0].shape[1:] == (1, 8, 8) and digits.num_classes == 10
    capped = load_images("digits", seed=0, max_train=100)
    assert len(capped.train[1]) == 100 and torch.equal(capped.test[1], digits.test[1])


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(TfuseError, match="allowed: mnist5k, digits, cifar10, cifar100"):
        load_images("imagenet")
    missing = tmp_path / "nowhere"
    with pytest.raises(TfuseError, match=f"data.path={missing}"):
        load_images("cifar10", path=str(missing))


def test_cifar_offline_explains_local_copy(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TfuseError, match="cifar100.*data.path=/path/to/copy.*parquet"):
        load_images("cifar100")


def test_cifar_from_parquet_file(tmp_path):
    _tiny_cifar(40, seed=0).to_parquet(str(tmp_path / "cifar.parquet"))
    data = load_images("cifar10", path=str(tmp_path / "cifar.parquet"), seed=0)
    assert sum(_sizes(data)) == 40 and len(data.test[1]) == 8
    assert data.train[0].shape[1:] == (3, 32, 32)
    assert data.class_names[:2] == ["class0", "class1"] and data.num_classes == 10


def test_cifar_from_save_to_disk(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": _tiny_cifar(30, seed=1), "test": _tiny_cifar(10, seed=2)})
    splits.save_to_disk(str(tmp_path / "copy"))
    data = load_images("cifar10", path=str(tmp_path / "copy"), val_fraction=0.1)
    assert _sizes(data) == (27, 3, 10)
    assert (data.channels, data.image_size) == (3, 32)


def test_task_batches(digits):
    task = ImageClassificationTask(digits)
    first = next(task.train_batches(batch_size=32, seed=0))
    assert first["pixel_values"].shape == (32, 1, 8, 8) and first["labels"].shape == (32,)
    assert torch.equal(first["labels"], next(task.train_batches(batch_size=32, seed=0))["labels"])
    calibration = list(task.calibration_batches(samples=100, batch_size=32, seed=0))
    assert [len(b["labels"]) for b in calibration] == [32, 32, 32, 4]
    assert set(task.model_inputs(first)) == {"pixel_values"}


def test_plain_tensor_model(digits):
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    metrics = ImageClassificationTask(digits).evaluate(mlp, "val")
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


def test_schedule_and_steps():
    cosine = lr_factor("cosine", steps=100, warmup=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0) and cosine(100) == pytest.approx(0.0)
    assert lr_factor("constant", steps=100, warmup=5)(50) == 1.0
    with pytest.raises(TfuseError, match="allowed: cosine, constant"):
        lr_factor("step", steps=10, warmup=0.1)
    assert epochs_to_steps(2, n_train=100, batch_size=32) == 8
    assert train(torch.nn.Linear(1, 1), None, steps=0, lr=1e-3, batch_size=1, seed=0)["steps"] == 0


def test_vit_learns_digits(trained_vit):
    model, task, result = trained_vit
    assert result["steps"] == 150 and result["final_loss"] < 1.0
    model.train()
    metrics = task.evaluate(model, "test")
    assert metrics["accuracy"] > 0.6 and model.training


def test_ensemble_of_identical_models_equals_single(trained_vit):
    model, task, _ = trained_vit
    single = task.evaluate(model, "val")
    ensemble = task.evaluate_ensemble([model, model], "val")
    assert ensemble["accuracy"] == single["accuracy"]
    assert ensemble["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_a_validation_curve_does_not_change_the_finetune(digits):
    """Evaluating every few steps leaves the trajectory (weights, losses) exactly as without."""
    from conftest import tiny_vit

    task = ImageClassificationTask(digits)
    runs = []
    for every in (0, 4):
        model = tiny_vit(seed=2)
        stats = train(model, task, steps=10, lr=1e-3, batch_size=32, seed=5, eval_every=every,
                      evaluate=lambda m=model: task.evaluate(m, "val")["accuracy"])
        runs.append((model, stats))
    (plain, a), (curved, b) = runs
    assert "curve" not in a and [step for step, _ in b["curve"]] == [0, 4, 8]  # the caller scores the trained model
    assert a["final_loss"] == b["final_loss"]
    for p, q in zip(plain.parameters(), curved.parameters()):
        assert torch.equal(p, q)


def test_steps_to_beat_reads_the_curve():
    from tfuse.pipeline.finetune import steps_to_beat

    curve = [[0, 0.5], [25, 0.89], [50, 0.91], [75, 0.95]]
    assert steps_to_beat(curve, 0.9, True) == 50 and steps_to_beat(curve, 0.96, True) is None
    assert steps_to_beat([[0, 3.0], [10, 2.0]], 2.5, False) == 10


def test_device_names_are_checked(monkeypatch):
    from tfuse.pipeline.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(TfuseError, match=f"device={name} but no CUDA GPU is visible"):
            resolve_device(name)
    for name in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(TfuseError, match="is not known; allowed: auto, cpu, cuda, cuda:N"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(TfuseError, match=r"device=cuda:2 but 2 CUDA GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_distillation_loss_is_the_cross_entropy_when_the_teacher_is_one_hot(weight):
    from tfuse.tasks.distill import distillation_loss

    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(16, 10, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    one_hot = torch.nn.functional.one_hot(targets, 10).float()
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert distillation_loss(logits, targets, one_hot, 1.0, weight) == pytest.approx(float(ce), rel=1e-6)
    soft = torch.softmax(torch.randn(16, 10, generator=gen), -1)
    assert distillation_loss(logits, targets, soft, 2.0, 1.0) > 0


def test_distilled_task_mixes_the_parents_predictions(digits):
    from conftest import tiny_vit
    from tfuse.tasks.distill import Distilled

    task = ImageClassificationTask(digits)
    student, parents = tiny_vit(0), [tiny_vit(1), tiny_vit(2)]
    batch = next(task.train_batches(32, 0))
    distilled = Distilled(task, parents, 2.0, 0.0).loss(student, batch).detach()
    assert float(distilled) == pytest.approx(float(task.loss(student, batch).detach()))
    # a student identical to its only teacher: the distillation term vanishes
    alone = Distilled(task, [student], 3.0, 1.0).loss(student, batch).detach()
    assert float(alone) == pytest.approx(0.0, abs=1e-6)
    assert float(Distilled(task, parents, 2.0, 1.0).loss(student, batch).detach()) > 1e-3
    with pytest.raises(TfuseError, match="kd_weight"):
        Distilled(task, parents, 2.0, 1.5)
