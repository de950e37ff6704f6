"""Classes whose family test files fuse another class through the command line (Qwen3 in
``hf_llama``, Gemma 2 in ``hf_gemma``, RoBERTa in ``hf_bert``): each saved as a checkpoint
directory beside a copy transformed under every symmetry its graph claims, fused with hard OT and
no repair, the family read from config.json (no ``model=``); the original comes back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, RobertaConfig, RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

from conftest import fuse_in_process
from tfuse.arch import family
from tfuse.data.tokenizer import train_bpe, train_tokenizer
from tfuse.errors import TfuseError
from tfuse.selftest import off_init, outputs
from tfuse.symmetry import symmetric_copy

TEXT = "def function(argument): return the value of a Python expression " * 40
SMALL = ("fusion.solver=emd", "fusion.repair=none", "finetune.steps=0", "fusion.samples=16",
         "fusion.batch_size=8", "data.max_length=24", "data.max_train=40", "data.max_eval=16", "eval_batch_size=16",
         "device=cpu")


def qwen3(vocab: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=False))


def gemma2(vocab: int) -> Gemma2ForCausalLM:
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=2.0,
                                          final_logit_softcapping=1.5))


def roberta(vocab: int, head=RobertaForMaskedLM):
    return head(RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=40, num_labels=3))


CASES = {  # class: (builder, family, tokenizer, transformation's signs, the data and knobs)
    "Qwen3ForCausalLM": (qwen3, "hf_llama", lambda: train_bpe([TEXT], 120), True, ("data=pydoc", "fusion.signs=true")),
    "Gemma2ForCausalLM": (gemma2, "hf_gemma", lambda: train_bpe([TEXT], 120), True, ("data=pydoc", "fusion.signs=true")),
    "RobertaForMaskedLM": (roberta, "hf_bert", lambda: train_tokenizer([TEXT], 120), False, ("data=pydoc",)),
    "RobertaForSequenceClassification": (  # on a classification task: a passage's genre (3 labels)
        lambda vocab: roberta(vocab, RobertaForSequenceClassification), "hf_bert", lambda: train_tokenizer([TEXT], 120),
        False, ("data=plays", "data.kind=text_classification")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_transformed_copy_fuses_back_through_the_cli_without_model(name, tmp_path: Path):
    build, fam_name, tokenizer_of, signs, knobs = CASES[name]
    fam = family(fam_name)
    tokenizer = tokenizer_of()
    torch.manual_seed(0)
    model = fam.attach_tokenizer(off_init(build(len(tokenizer)).eval(), 0), tokenizer)
    assert type(model).__name__ == name
    twin = symmetric_copy(model, fam.graph(model), seed=1, signs=signs)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    fam.save(model, str(a))
    fam.save(twin, str(b))
    results = fuse_in_process(out, f"parents=[{a},{b}]", *SMALL, *knobs, f"cache_dir={tmp_path / 'cache'}",
                              f"statistics_dir={tmp_path / 'stats'}")
    fused = fam.load(str(out / "fused"))
    assert type(fused) is type(model)
    mine = dict(model.named_parameters())
    for key, w in fused.named_parameters():
        torch.testing.assert_close(w, mine[key], atol=1e-5, rtol=0, msg=key)
    ids = torch.randint(4, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(fused, {"input_ids": ids}), outputs(model, {"input_ids": ids}), atol=1e-5, rtol=0)
    assert results["one_shot"]["ot"] == pytest.approx(results["one_shot"]["parent_0"], rel=1e-4)
    assert json.loads((out / "results.json").read_text())["settings"]["repair"] == "none"


def test_a_classifier_on_a_language_modelling_task_is_one_line(tmp_path: Path):
    fam = family("hf_bert")
    tokenizer = train_tokenizer([TEXT], 120)
    torch.manual_seed(0)
    for name in "ab":
        fam.save(fam.attach_tokenizer(roberta(len(tokenizer), RobertaForSequenceClassification).eval(), tokenizer),
                 str(tmp_path / name))
    with pytest.raises(TfuseError, match="RobertaForSequenceClassification has no language-model head.*"
                                         "data.kind=text_classification"):
        fuse_in_process(tmp_path / "run", f"parents=[{tmp_path / 'a'},{tmp_path / 'b'}]", "data=pydoc", *SMALL,
                        f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}")
