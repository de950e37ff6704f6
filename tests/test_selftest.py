"""The self-test every family gets: each family's tiny model passes it, and a graph that claims a
symmetry the model does not have, or leaves a parameter out, fails it by name."""
import dataclasses
from pathlib import Path

import pytest

from conftest import tfuse
from tfuse.arch import FAMILIES, family
from tfuse.selftest import self_test


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_passes_its_self_test(name):
    fam = family(name)
    checks = self_test(fam.tiny(), fam.graph)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert len(checks) >= 4


def test_a_claimed_symmetry_the_model_lacks_fails():
    """GELU is not odd: a GPT-2 graph that lets its MLP units flip sign is caught."""
    fam = family("hf_gpt2")

    def wrong(model):
        graph = fam.graph(model)
        return dataclasses.replace(graph, signed=graph.signed | {s for s in graph.spaces() if s.endswith(".mlp")})

    checks = {c.name: c for c in self_test(fam.tiny(), wrong)}
    failed = checks["a copy under the graph's symmetries computes the same outputs"]
    assert not failed.passed and "output difference" in failed.detail


def test_a_parameter_the_graph_leaves_out_is_named():
    fam = family("hf_llama")

    def partial(model):
        graph = fam.graph(model)
        return dataclasses.replace(graph, params={n: a for n, a in graph.params.items() if "layers.1.mlp.up_proj" not in n})

    checks = self_test(fam.tiny(), partial)
    assert len(checks) == 1 and not checks[0].passed and "model.layers.1.mlp.up_proj.weight" in checks[0].detail


def test_the_command(tmp_path: Path):
    ok = tfuse("check-family", "model=hf_gpt2", cwd=tmp_path)
    assert ok.returncode == 0 and "fused with that copy, the model comes back" in ok.stdout and "FAILED" not in ok.stdout
    bad = tfuse("check-family", "model=hf_gpt2", "seed=3", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown argument 'seed=3'" in bad.stderr


@pytest.mark.parametrize("variant", ["qwen3", "llama"])
def test_recipe_llamas_and_qwen3s_pass_the_llama_familys_self_test(variant):
    """``model.variant=qwen3`` (qwen3_plays's parents): the LLaMA layout with per-head q_norm / k_norm
    whose gain every head shares."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    from tfuse.data.tokenizer import train_bpe

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/model/hf_llama.yaml")
    cfg.merge_with({"hidden_size": 32, "mlp_size": 48, **({"variant": variant} if variant != "llama" else {})})
    task = SimpleNamespace(tokenizer=train_bpe(["a few words of text " * 20], 80), max_length=16)
    torch.manual_seed(0)
    model = family("hf_llama").build(cfg, task)
    assert type(model) is {"qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}[variant]
    assert model.config.head_dim == 8 and hasattr(model.model.layers[0].self_attn, "q_norm") == (variant == "qwen3")
    checks = self_test(model, family("hf_llama").graph)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize("head", ["mlm", "classification"])
def test_roberta_passes_the_bert_familys_self_test(head):
    """RoBERTa: BERT's post-LN layout under other names (lm_head; a dense-tanh classifier on the first token)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=40, num_labels=3)
    model = (RobertaForMaskedLM if head == "mlm" else RobertaForSequenceClassification)(config)
    checks = self_test(model, family("hf_bert").graph)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_robertas_mlm_logits_and_classifier_come_from_its_own_head():
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    from tfuse.arch import hf_bert

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=48, max_position_embeddings=40)).eval()
    inputs = {"input_ids": torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(1))}
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, 2] = keep[1, 5] = True
    with torch.no_grad():
        torch.testing.assert_close(hf_bert.masked_logits(model, inputs, keep), model(**inputs).logits[keep])
    clf = hf_bert.to_classifier(model, 3, seed=0)
    assert isinstance(clf, RobertaForSequenceClassification)
    for name, p in model.roberta.named_parameters():
        assert torch.equal(dict(clf.roberta.named_parameters())[name], p)
