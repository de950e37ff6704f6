"""Tasks: a dataset with its splits plus how models are trained and scored on it."""
from __future__ import annotations

from tfuse.errors import TfuseError
from tfuse.tasks.base import Scoring, Task

DATA_KINDS = ("images", "text", "text_classification")


def build_task(data_cfg, eval_batch_size: int, device: str, parents=None, family_name: str | None = None,
               evaluation=None) -> Task:
    """The task a ``data`` config group describes; given checkpoints, images are normalised as
    their own preprocessing says and text uses their tokenizer. ``evaluation``: the ``eval`` block
    (how language models are scored)."""
    scoring = Scoring.from_config(evaluation)
    if scoring.max_tokens is not None and data_cfg.kind != "text":
        raise TfuseError(f"eval.max_tokens={scoring.max_tokens} caps the tokens a language model is scored on, but "
                         f"data.kind={data_cfg.kind} is scored by whole examples; drop it")
    if data_cfg.kind == "images":
        from tfuse.arch import parents_preprocessing
        from tfuse.data.images import load_images
        from tfuse.tasks.image_classification import ImageClassificationTask

        normalization = parents_preprocessing([str(p) for p in parents], family_name) if parents and family_name else None
        data = load_images(
            data_cfg.name, data_cfg.path, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.seed, data_cfg.max_train,
            normalization,
        )
        return ImageClassificationTask(data, eval_batch_size, device)
    if data_cfg.kind in ("text", "text_classification"):
        from tfuse.arch import is_causal, shared_tokenizer
        from tfuse.data.text import load_text

        family_name = family_name or "hf_bert"
        tokenizer = shared_tokenizer([str(p) for p in parents], family_name) if parents else None
        if is_causal(family_name):
            if data_cfg.kind != "text":
                raise TfuseError(f"data.kind={data_cfg.kind}: model.family={family_name} is a causal LM; use text data")
            from tfuse.tasks.causal_lm import PROMPT, CausalLMTask

            data = load_text(data_cfg, tokenizer, causal=True)
            return CausalLMTask(data, eval_batch_size, device, data_cfg.get("prompt") or PROMPT, scoring=scoring)
        if data_cfg.kind == "text_classification":
            from tfuse.tasks.text_classification import genre_task

            return genre_task(data_cfg, tokenizer, eval_batch_size, device)
        from tfuse.tasks.mlm import MLMTask

        data = load_text(data_cfg, tokenizer)
        return MLMTask(data, eval_batch_size, device, data_cfg.get("mask_probability", 0.15), data_cfg.get("mask_seed", 1234),
                       scoring)
    raise TfuseError(f"data.kind={data_cfg.kind!r} is not known; allowed: {', '.join(DATA_KINDS)}")
