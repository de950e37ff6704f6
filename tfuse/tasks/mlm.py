"""Masked language modelling (BERT pretraining objective) and, for bare encoders without a head,
the agreement of mean-pooled embeddings with the parents'.

Masking follows BERT: 15% of the real tokens (never [CLS], [SEP] or padding) are chosen; of those
80% become [MASK], 10% a random token, 10% stay. Training batches are masked afresh each time
(seeded); evaluation masks each split once with ``mask_seed``, so every model is scored on exactly
the same masked positions. The ensemble averages logits.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.arch import text_family_for
from tfuse.data.text import TextData
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, Scoring
from tfuse.tasks.text import TokenTask, batches, model_inputs_of

SPLITS = ("train", "val", "test")


def mask_tokens(
    batch: Batch, tokenizer, generator: torch.Generator, probability: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels with -100 where nothing is predicted)."""
    ids = batch["input_ids"]
    special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id) | (batch["attention_mask"] == 0)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels = ids.masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = torch.randint(len(SPECIAL_SKIP), len(tokenizer), ids.shape, generator=generator)[swap]
    return masked, labels


SPECIAL_SKIP = range(5)  # random replacements avoid the first ids (special tokens of our WordPiece)


class MLMTask(TokenTask):
    """Masked language modelling on a text corpus; scored by loss (lower is better)."""

    name = "mlm"
    head = "mlm"
    primary_metric = "loss"
    higher_is_better = False
    accuracy_name = "masked_accuracy"

    def __init__(self, data: TextData, eval_batch_size: int = 64, device: str | torch.device = "cpu",
                 mask_probability: float = 0.15, mask_seed: int = 1234, scoring: Scoring = Scoring()):
        super().__init__(data, eval_batch_size, device, scoring)
        self.mask_probability = mask_probability
        self.mask_seed = mask_seed
        self._fixed: dict[str, list[Batch]] = {}

    def training_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        ids, labels = mask_tokens(batch, self.tokenizer, generator, self.mask_probability)
        return {**batch, "input_ids": ids, "labels": labels}

    def restricted(self, index: torch.Tensor) -> "MLMTask":
        task = super().restricted(index)
        task._fixed = {k: v for k, v in self._fixed.items() if k != "train"}  # val and test are shared
        return task

    def scored(self, batch: Batch) -> Batch:
        return self.training_batch(batch, torch.Generator().manual_seed(self.mask_seed))

    def owners(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != -100).nonzero()[:, 0]

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked positions and the tokens they hid."""
        keep = batch["labels"] != -100
        return keep, batch["labels"][keep]

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the masked positions and the tokens they must predict."""
        labels = batch["labels"].to(self.device)
        keep = labels != -100
        return masked_logits(model, self.model_inputs(batch), keep).float(), labels[keep]

    def evaluation_batches(self, split: str) -> list[Batch]:
        """The split masked as training batches are, once with ``mask_seed`` (cached: every model
        sees the same masks)."""
        if split not in SPLITS:
            raise TfuseError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
        if split not in self._fixed:
            generator = torch.Generator().manual_seed(self.mask_seed)
            seq = getattr(self.data, split)
            order = torch.arange(min(len(seq), 512) if split == "train" else len(seq))
            self._fixed[split] = [self.training_batch(b, generator) for b in batches(seq, order, self.eval_batch_size)]
        return self._fixed[split]

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Loss, perplexity and masked-token accuracy of the averaged (``weights``: weighted) logits
        of ``models``."""
        share = None if weights is None else [w / sum(weights) for w in weights]

        def mix(logits: Iterator[torch.Tensor]) -> torch.Tensor:
            # unweighted: the sum over models divided once, as the IID results were computed
            mean = sum(logits) / len(models) if share is None else sum(w * x for w, x in zip(share, logits))
            return F.log_softmax(mean, dim=-1)

        return self.token_metrics(models, self.evaluation_batches(split), mix)


def masked_logits(model: nn.Module, inputs: Batch, keep: torch.Tensor) -> torch.Tensor:
    """The masked-LM logits of ``model`` at the ``keep`` positions (from its family)."""
    return text_family_for(model, "masked language modelling").masked_logits(model, inputs, keep)


def mean_pooled(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean over real tokens of the encoder's last hidden states (sentence-transformers pooling)."""
    inputs = model_inputs_of(batch, device)
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class EmbeddingAgreementTask:
    """For bare encoders (no head): how closely a model's mean-pooled embeddings agree (cosine,
    averaged over held-out sequences) with each parent's. Nothing to train."""

    name = "embedding_agreement"
    primary_metric = "mean_cosine"
    higher_is_better = True

    def __init__(self, base: MLMTask, parents: Sequence[nn.Module]):
        self.base = base
        self.parents = list(parents)
        self.tokenizer, self.max_length, self.data = base.tokenizer, base.max_length, base.data
        self._reference: dict[str, list[torch.Tensor]] = {}

    @property
    def train_size(self) -> int:
        return self.base.train_size

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        return self.base.train_batches(batch_size, seed)

    def calibration_batches(self, samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        return self.base.calibration_batches(samples, batch_size, seed)

    def model_inputs(self, batch: Batch) -> Batch:
        return self.base.model_inputs(batch)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise TfuseError("a bare BertModel has no head to finetune; set finetune.steps=0")

    @torch.no_grad()
    def _embeddings(self, models: Sequence[nn.Module], split: str, weights: Sequence[float] | None = None) -> list[torch.Tensor]:
        seq = getattr(self.data, split)
        share = [1.0] * len(models) if weights is None else [len(models) * w / sum(weights) for w in weights]
        out = []
        for batch in batches(seq, torch.arange(len(seq)), self.base.eval_batch_size):
            out.append(sum(s * mean_pooled(m.eval(), batch, self.base.device) for s, m in zip(share, models)) / len(models))
        return out

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return self.evaluate_ensemble([model], split)

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Mean cosine to each parent's embeddings (the ensemble's embedding: their (weighted) average)."""
        mine = self._embeddings(models, split, weights)
        scores = {}
        for i, parent in enumerate(self.parents):
            key = f"{split}/{i}"
            if key not in self._reference:
                self._reference[key] = self._embeddings([parent], split)
            cos = torch.cat([F.cosine_similarity(a, b, dim=-1) for a, b in zip(mine, self._reference[key])])
            scores[f"cosine_parent_{i}"] = float(cos.mean())
        scores["mean_cosine"] = sum(scores.values()) / len(self.parents)
        return scores


def for_models(task, models: Sequence[nn.Module]):
    """The task to score ``models`` with: MLM as is, embedding agreement for bare encoders."""
    if isinstance(task, MLMTask) and models and not text_family_for(models[0], task.name).has_head(models[0]):
        return EmbeddingAgreementTask(task, models)
    return task
