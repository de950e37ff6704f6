"""Causal language modelling: every real token after the first is predicted from the ones
before it. Scored by next-token loss (lower is better), perplexity and top-1 accuracy on
held-out text; the ensemble averages the members' probabilities. A fixed prompt's greedy
continuation shows what a model (a fused one especially) does with text."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.text import TextData
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, Scoring, mixed_log_probs
from tfuse.tasks.text import TokenTask, batches

SPLITS = ("train", "val", "test")
PROMPT = "To be, or not to be"


class CausalLMTask(TokenTask):
    name = "causal_lm"
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, data: TextData, eval_batch_size: int = 64, device: str | torch.device = "cpu",
                 prompt: str = PROMPT, continuation_tokens: int = 24, scoring: Scoring = Scoring()):
        super().__init__(data, eval_batch_size, device, scoring)
        self.prompt, self.continuation_tokens = prompt, continuation_tokens

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position followed by a real token, and that token."""
        follows = batch["attention_mask"][:, 1:] == 1
        keep = torch.cat([follows, torch.zeros_like(follows[:, :1])], dim=1)
        return keep, batch["input_ids"][:, 1:][follows]

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep, labels = self.targets(batch)
        return model(**self.model_inputs(batch)).logits[keep.to(self.device)].float(), labels.to(self.device)

    def owners(self, batch: Batch) -> torch.Tensor:
        return self.targets(batch)[0].nonzero()[:, 0]

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Next-token loss, perplexity and top-1 accuracy of the averaged (``weights``: weighted)
        probabilities of ``models``."""
        if split not in SPLITS:
            raise TfuseError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
        seq = getattr(self.data, split)
        order = torch.arange(min(len(seq), 512) if split == "train" else len(seq))
        return self.token_metrics(models, batches(seq, order, self.eval_batch_size),
                                  lambda logits: mixed_log_probs((F.log_softmax(x, dim=-1) for x in logits), weights))

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
