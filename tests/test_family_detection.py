"""`tfuse fuse parents=[...]` without model= reads the family from the checkpoints' config.json and
fuses with that family's preset; a checkpoint no family owns, or parents of two families, end in
one line."""
import json
from pathlib import Path

import pytest

from conftest import tfuse


def checkpoint(folder: Path, config: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


@pytest.mark.parametrize("config, family, experiment", [
    (LLAMA, "hf_llama", "llama_plays"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "hf_llama", "llama_plays"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "hf_gpt2", "gpt_plays"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "hf_bert", "bert_mlm"),
    ({"architecture": "vit_tiny_patch16_224", "num_classes": 10}, "timm_vit", "vit_mnist"),
])
def test_the_family_comes_from_the_checkpoint(tmp_path: Path, config: dict, family: str, experiment: str):
    a, b = (checkpoint(tmp_path / name, config) for name in "ab")
    proc = tfuse("fuse", f"parents=[{a},{b}]", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"({family}, read from their config.json) without +experiment: fusing with {experiment}'s settings" in proc.stderr
    assert f"family: {family}" in proc.stdout


def test_a_model_given_on_the_command_line_wins(tmp_path: Path):
    a, b = (checkpoint(tmp_path / name, LLAMA) for name in "ab")
    proc = tfuse("fuse", f"parents=[{a},{b}]", "model=hf_gpt2", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "family: hf_gpt2" in proc.stdout and "read from their config.json" not in proc.stderr


@pytest.mark.parametrize("configs, says", [
    ([{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}] * 2,
     "holds a MambaForCausalLM (model_type 'mamba'), which no tfuse family owns"),
    ([LLAMA, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}], "checkpoints of different families"),
])
def test_checkpoints_no_family_or_two_families_own_are_one_line(tmp_path: Path, configs: list, says: str):
    a, b = (checkpoint(tmp_path / name, c) for name, c in zip("ab", configs))
    proc = tfuse("fuse", f"parents=[{a},{b}]", cwd=tmp_path)
    assert proc.returncode == 2 and says in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


VIT = {"model_type": "vit", "architectures": ["ViTForImageClassification"]}


@pytest.mark.parametrize("experiment, dropped", [
    ("vit_mnist_skew", "(partition=iid)"),
    ("vit_mnist_dirichlet", "(partition=iid fusion.alpha=null)"),
])
def test_a_presets_partition_does_not_apply_to_checkpoints(tmp_path: Path, experiment: str, dropped: str):
    a, b = (checkpoint(tmp_path / name, VIT) for name in "ab")
    proc = tfuse("fuse", f"+experiment={experiment}", f"parents=[{a},{b}]", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{experiment}'s data partition does not apply to them {dropped}" in proc.stderr
    assert "kind: iid" in proc.stdout and "alpha: shard" not in proc.stdout


def test_a_partition_given_on_the_command_line_is_kept(tmp_path: Path):
    a, b = (checkpoint(tmp_path / name, VIT) for name in "ab")
    proc = tfuse("fuse", "+experiment=vit_mnist_skew", f"parents=[{a},{b}]", "partition=skew", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "does not apply" not in proc.stderr and "kind: skew" in proc.stdout


@pytest.mark.parametrize("change, says", [
    ({"vocab_size": 70}, "different vocabularies"),
    ({"num_hidden_layers": 3}, "different depths"),
    ({"head_dim": 16}, "different head dimensions"),
    ({"rope_theta": 5e5}, "different RoPE settings"),
])
def test_parents_that_cannot_be_fused_are_one_line(change: dict, says: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tfuse.arch import check_same_architecture
    from tfuse.errors import TfuseError

    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    models = [LlamaForCausalLM(LlamaConfig(**base)), LlamaForCausalLM(LlamaConfig(**{**base, **change}))]
    with pytest.raises(TfuseError, match=says):
        check_same_architecture(models, allow_widths=True)


def test_parents_with_different_tokenizers_are_one_line(tmp_path: Path):
    from tokenizers import Tokenizer, models as tok_models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tfuse.arch import check_same_architecture
    from tfuse.arch.tokenized import attach_tokenizer
    from tfuse.errors import TfuseError

    def tokenizer(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(
            {w: i for i, w in enumerate(words)}, unk_token=words[0])))

    config = GPT2Config(vocab_size=3, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    same = [attach_tokenizer(GPT2LMHeadModel(config), tokenizer(["a", "b", "c"])) for _ in range(2)]
    check_same_architecture(same, allow_widths=False)
    other = attach_tokenizer(GPT2LMHeadModel(config), tokenizer(["a", "c", "b"]))
    with pytest.raises(TfuseError, match="different tokenizers"):
        check_same_architecture([same[0], other], allow_widths=False)


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes_into_a_known_family(name):
    """Each preset composes (as ``tfuse fuse +experiment=NAME`` does) and names a family whose
    recipe it can build; the presets a family owns for its checkpoints exist."""
    from tfuse.arch import FAMILIES
    from tfuse.config_keys import _compose
    from tfuse.families import OWNERS

    cfg = _compose([f"+experiment={name}"])
    assert cfg.model.family in FAMILIES
    if name == "qwen3_plays":
        assert cfg.model.family == "hf_llama" and cfg.model.variant == "qwen3"
    assert {owner.experiment for owner in OWNERS.values()} <= set(EXPERIMENTS)
