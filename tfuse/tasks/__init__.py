"""Tasks: a dataset with its splits plus how models are trained and scored on it."""
from __future__ import annotations

from tfuse.errors import TfuseError
from tfuse.tasks.base import Task

DATA_KINDS = ("images",)


def build_task(data_cfg, eval_batch_size: int, device: str) -> Task:
    """The task a ``data`` config group describes."""
    if data_cfg.kind == "images":
        from tfuse.data.images import load_images
        from tfuse.tasks.image_classification import ImageClassificationTask

        data = load_images(
            data_cfg.name, data_cfg.path, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.seed, data_cfg.max_train
        )
        return ImageClassificationTask(data, eval_batch_size, device)
    raise TfuseError(f"data.kind={data_cfg.kind!r} is not known; allowed: {', '.join(DATA_KINDS)}")
