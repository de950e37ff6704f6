"""Sequence classification for BERT: the genre of a play from a passage (offline, split by play),
or a GLUE task through ``datasets`` (nyu-mll/glue). Scored by accuracy, plus F1 where the task
uses it (macro F1 for the genres, binary F1 for MRPC and QQP)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.text import Sequences, TextData, cap, load_text, pad
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, evaluating, mixed_log_probs
from tfuse.tasks.text import TextTask, batches

# task -> (text columns, number of labels, F1 kind or None, validation split used as test)
GLUE = {
    "cola": (("sentence",), 2, None), "sst2": (("sentence",), 2, None),
    "mrpc": (("sentence1", "sentence2"), 2, "binary"), "qqp": (("question1", "question2"), 2, "binary"),
    "mnli": (("premise", "hypothesis"), 3, None), "qnli": (("question", "sentence"), 2, None),
    "rte": (("sentence1", "sentence2"), 2, None), "wnli": (("sentence1", "sentence2"), 2, None),
}


def f1_score(pred: torch.Tensor, target: torch.Tensor, classes: int, kind: str) -> float:
    scores = []
    for c in ([1] if kind == "binary" else range(classes)):
        tp = int(((pred == c) & (target == c)).sum())
        fp, fn = int(((pred == c) & (target != c)).sum()), int(((pred != c) & (target == c)).sum())
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / len(scores)


class TextClassificationTask(TextTask):
    name = "text_classification"
    head = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, data: TextData, f1: str | None = None, eval_batch_size: int = 64,
                 device: str | torch.device = "cpu", name: str = "text_classification"):
        super().__init__(data, eval_batch_size, device)
        self.num_labels = len(data.label_names)
        self.label_names = data.label_names
        self.f1 = f1
        self.name = name

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(**self.model_inputs(batch)).logits.float(), batch["labels"].to(self.device)

    @torch.no_grad()
    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Accuracy, NLL (and F1) of the averaged (``weights``: weighted) probabilities of ``models``."""
        seq: Sequences = getattr(self.data, split)
        preds, nll = [], 0.0
        with evaluating(models):
            for batch in batches(seq, torch.arange(len(seq)), self.eval_batch_size):
                inputs = self.model_inputs(batch)
                mean = mixed_log_probs((F.log_softmax(m(**inputs).logits.float(), -1) for m in models), weights)
                nll += float(F.nll_loss(mean, batch["labels"].to(self.device), reduction="sum"))
                preds.append(mean.argmax(-1).cpu())
        pred = torch.cat(preds)
        out = {"accuracy": float((pred == seq.labels).float().mean()), "loss": nll / len(seq)}
        if self.f1:
            out["f1"] = f1_score(pred, seq.labels, self.num_labels, self.f1)
        return out


def genre_task(cfg, tokenizer, eval_batch_size: int, device: str) -> TextClassificationTask:
    """Genre of a play (comedy, history, tragedy) from a passage; plays split as for MLM."""
    if cfg.name != "plays":
        raise TfuseError(f"the genre task reads the plays; got data name {cfg.name!r}")
    data = load_text(cfg, tokenizer, labelled=True)
    return TextClassificationTask(data, "macro", eval_batch_size, device, name="genre")


def glue_task(cfg, tokenizer, eval_batch_size: int, device: str) -> TextClassificationTask:
    """A GLUE task through datasets (validation split as test, a seeded slice of train as val)."""
    name = str(cfg.task).lower()
    if name not in GLUE:
        raise TfuseError(f"downstream.task={name!r} is not a GLUE task here; allowed: {', '.join(GLUE)}")
    columns, classes, f1 = GLUE[name]
    try:
        import datasets

        ds = datasets.load_dataset(cfg.get("path") or "nyu-mll/glue", name)
    except Exception as err:
        raise TfuseError(f"GLUE {name} needs the hub (nyu-mll/glue) or downstream.path: {err}") from err
    test_split = "validation_matched" if name == "mnli" else "validation"

    def encode(split) -> Sequences:
        texts = [split[c] for c in columns]
        enc = tokenizer(*texts, truncation=True, max_length=cfg.max_length)
        seq = pad(tokenizer, enc["input_ids"], cfg.max_length, list(split["label"]))
        if "token_type_ids" in enc:
            seq.token_type_ids = pad(tokenizer, enc["token_type_ids"], cfg.max_length).input_ids.clamp_max(1)
        return seq

    full = encode(ds["train"])
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = min(1000, len(full) // 10)
    pick = lambda idx: Sequences(full.input_ids[idx], full.attention_mask[idx], full.labels[idx],  # noqa: E731
                                 None if full.token_type_ids is None else full.token_type_ids[idx])
    train, val = pick(order[n_val:].sort().values), pick(order[:n_val].sort().values)
    data = TextData(cap(train, cfg.get("max_train"), cfg.seed), val, cap(encode(ds[test_split]), cfg.get("max_eval"), cfg.seed),
                    tokenizer, cfg.max_length, [str(i) for i in range(classes)])
    return TextClassificationTask(data, f1, eval_batch_size, device, name=f"glue_{name}")
