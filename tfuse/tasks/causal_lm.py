"""Causal language modelling: every real token after the first is predicted from the ones
before it. Scored by next-token loss (lower is better), perplexity and top-1 accuracy on
held-out text; the ensemble averages the members' probabilities. A fixed prompt's greedy
continuation shows what a model (a fused one especially) does with text."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.text import TextData
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, mixed_log_probs
from tfuse.tasks.text import TextTask, batches

SPLITS = ("train", "val", "test")
PROMPT = "To be, or not to be"


def next_token_logits(model: nn.Module, inputs: Batch, keep: torch.Tensor) -> torch.Tensor:
    """Logits of the next token at the ``keep`` positions (rows in ``keep`` order)."""
    return model(**inputs).logits[:, :-1][keep].float()


class CausalLMTask(TextTask):
    name = "causal_lm"
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, data: TextData, eval_batch_size: int = 64, device: str | torch.device = "cpu",
                 prompt: str = PROMPT, continuation_tokens: int = 24):
        super().__init__(data, eval_batch_size, device)
        self.prompt, self.continuation_tokens = prompt, continuation_tokens

    @staticmethod
    def _targets(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Which positions predict a real next token, and that token."""
        ids = batch["input_ids"].to(device)
        keep = batch["attention_mask"].to(device)[:, 1:] == 1
        return keep, ids[:, 1:][keep]

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep, labels = self._targets(batch, self.device)
        return next_token_logits(model, self.model_inputs(batch), keep), labels

    def owners(self, batch: Batch) -> torch.Tensor:
        return (batch["attention_mask"][:, 1:] == 1).nonzero()[:, 0]

    @torch.no_grad()
    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Next-token loss, perplexity and top-1 accuracy of the averaged (``weights``: weighted)
        probabilities of ``models``."""
        if split not in SPLITS:
            raise TfuseError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
        seq = getattr(self.data, split)
        order = torch.arange(min(len(seq), 512) if split == "train" else len(seq))
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        nll, correct, count = 0.0, 0, 0
        try:
            for batch in batches(seq, order, self.eval_batch_size):
                inputs = self.model_inputs(batch)
                keep, target = self._targets(batch, self.device)
                log_probs = torch.stack([F.log_softmax(next_token_logits(m, inputs, keep), dim=-1) for m in models])
                mixed = log_probs[0] if len(models) == 1 else mixed_log_probs(log_probs, weights)
                nll += float(F.nll_loss(mixed, target, reduction="sum"))
                correct += int((mixed.argmax(-1) == target).sum())
                count += len(target)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        loss = nll / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1)}

    @torch.no_grad()
    def continuation(self, model: nn.Module) -> str:
        """The greedy continuation of ``prompt`` (``continuation_tokens`` new tokens, within the
        model's positions)."""
        tok = self.tokenizer
        ids = torch.tensor([[tok.bos_token_id, *tok(self.prompt, add_special_tokens=False)["input_ids"]]], device=self.device)
        start, mode = ids.shape[1], model.training
        model.eval()
        try:
            for _ in range(min(self.continuation_tokens, self.max_length - start)):
                step = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, step], dim=1)
        finally:
            model.train(mode)
        return tok.decode(ids[0, start:].tolist())
