"""Evaluation at scale (log-probabilities a chunk of positions at a time, a cap on the scored
tokens, no pass over a split repeated) and the finetune's methods (full, LoRA merged back)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import fuse_in_process, tiny_vit
from tfuse.data.text import Sequences, TextData
from tfuse.errors import TfuseError
from tfuse.pipeline.finetune import finetune, lora
from tfuse.tasks import build_task
from tfuse.tasks.base import Scoring
from tfuse.tasks.causal_lm import CausalLMTask
from tfuse.tasks.image_classification import ImageClassificationTask
from tfuse.tasks.mlm import MLMTask

VOCAB = 50


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
    )).eval()


def tiny_bert(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )).eval()


def sequences(n: int = 14, length: int = 12, seed: int = 1) -> Sequences:
    """Ragged sequences ([CLS]=2 ... [SEP]=3, then padding) of random tokens."""
    ids = torch.randint(5, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        keep = 5 + i % (length - 5)
        ids[i, 0], ids[i, keep - 1] = 2, 3
        ids[i, keep:], mask[i, keep:] = 0, 0
    return Sequences(ids, mask)


class Tokenizer:
    cls_token_id, sep_token_id, mask_token_id = 2, 3, 4

    def __len__(self) -> int:
        return VOCAB


def text_data() -> TextData:
    return TextData(sequences(seed=0), sequences(seed=1), sequences(seed=2), Tokenizer(), 12)


def whole_vocabulary_scores(models, batches, mixed) -> list[tuple[float, bool]]:
    """Per scored token, in order: its NLL and whether the top-1 is right, from every member's
    logits over the whole batch at once (how evaluation was written before it was chunked)."""
    out = []
    with torch.no_grad():
        for batch, keep, target in batches:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            log_probs = mixed([m(**inputs).logits[keep].float() for m in models])
            out += zip((-log_probs.gather(1, target[:, None])[:, 0]).tolist(), (log_probs.argmax(-1) == target).tolist())
    return out


def summary(scores: list[tuple[float, bool]]) -> tuple[float, float]:
    return sum(s for s, _ in scores) / len(scores), sum(c for _, c in scores) / len(scores)


def mixture(weights):
    def mixed(logits):
        log_probs = torch.stack([F.log_softmax(x, -1) for x in logits])
        if weights is None:
            return torch.logsumexp(log_probs, 0) - math.log(len(logits))
        log_w = torch.tensor(weights).log().view(-1, 1, 1)
        return torch.logsumexp(log_probs + log_w, 0)
    return mixed


def causal_batches(task: CausalLMTask, split: str):
    seq = getattr(task.data, split)
    for start in range(0, len(seq), task.eval_batch_size):
        batch = seq.batch(torch.arange(start, min(start + task.eval_batch_size, len(seq))))
        yield (batch, *task.targets(batch))


@pytest.mark.parametrize("chunk", [3, 2048])
def test_chunked_causal_scores_equal_the_whole_vocabulary_at_once(chunk: int):
    models = [tiny_llama(seed) for seed in range(3)]
    task = CausalLMTask(text_data(), eval_batch_size=4, scoring=Scoring(chunk_tokens=chunk))
    for members, weights in (([models[0]], None), (models, None), (models, [0.2, 0.3, 0.5])):
        got = task.evaluate_ensemble(members, "test", weights)
        loss, accuracy = summary(whole_vocabulary_scores(members, causal_batches(task, "test"), mixture(weights)))
        assert got["loss"] == pytest.approx(loss, rel=1e-6) and got["accuracy"] == accuracy
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_chunked_mlm_scores_equal_the_whole_head_at_once():
    models = [tiny_bert(seed) for seed in range(2)]
    task = MLMTask(text_data(), eval_batch_size=4, scoring=Scoring(chunk_tokens=5))
    batches = [(b, b["labels"] != -100, b["labels"][b["labels"] != -100]) for b in task.evaluation_batches("val")]
    for weights in (None, [0.25, 0.75]):
        share = [0.5, 0.5] if weights is None else weights
        mean_logits = lambda logits: F.log_softmax(sum(w * x for w, x in zip(share, logits)), -1)  # noqa: E731
        loss, accuracy = summary(whole_vocabulary_scores(models, batches, mean_logits))
        got = task.evaluate_ensemble(models, "val", weights)
        assert got["loss"] == pytest.approx(loss, rel=1e-6) and got["masked_accuracy"] == accuracy


def test_max_tokens_scores_the_first_tokens_and_reads_no_further():
    model = tiny_llama()
    every = whole_vocabulary_scores([model], causal_batches(CausalLMTask(text_data(), eval_batch_size=4), "val"),
                                    mixture(None))
    per_batch = [len(target) for _, _, target in causal_batches(CausalLMTask(text_data(), eval_batch_size=4), "val")]
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for cap in (1, per_batch[0] + 1, len(every) - 1, 10_000):
        calls.clear()
        task = CausalLMTask(text_data(), eval_batch_size=4, scoring=Scoring(chunk_tokens=4, max_tokens=cap))
        got = task.evaluate(model, "val")
        loss, accuracy = summary(every[:cap])
        assert got["loss"] == pytest.approx(loss, rel=1e-6) and got["accuracy"] == accuracy
        needed = next((b + 1 for b in range(len(per_batch)) if sum(per_batch[:b + 1]) >= cap), len(per_batch))
        assert len(calls) == needed  # the batches after the cap are never run


def test_bad_eval_and_finetune_values_name_the_key():
    with pytest.raises(TfuseError, match=r"eval\.chunk_tokens=0 must be a positive"):
        Scoring.from_config({"chunk_tokens": 0})
    with pytest.raises(TfuseError, match=r"eval\.max_tokens='all' must be a positive number of tokens or null"):
        Scoring.from_config({"max_tokens": "all"})
    digits = OmegaConf.create({"kind": "images", "name": "digits", "path": None, "val_fraction": 0.1,
                               "test_fraction": 0.1, "seed": 0, "max_train": None})
    with pytest.raises(TfuseError, match=r"eval\.max_tokens=100 caps .* data\.kind=images is scored by whole examples"):
        build_task(digits, 64, "cpu", evaluation={"max_tokens": 100})
    cfg = OmegaConf.create({"finetune": {"steps": 1, "method": "qlora"}})
    with pytest.raises(TfuseError, match=r"finetune\.method='qlora' is not known; allowed: full, lora"):
        finetune(tiny_llama(), None, cfg, 0, "cpu", "OT")
    with pytest.raises(TfuseError, match=r"finetune\.lora_rank=0 must be a positive integer"):
        with lora(tiny_llama(), 0, 16):
            pass


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert, tiny_vit], ids=["llama", "gpt2", "bert", "vit"])
def test_lora_adapts_every_linear_layer_of_the_blocks_and_merges_back(build):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lora(model, 4, 8):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        adapted = {n.split(".lora_")[0] for n in trainable}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)  # LoRA's B starts at zero: make the adapters matter
    after = model.state_dict()
    assert after.keys() == before.keys() and all(p.requires_grad for p in model.parameters())
    changed = {k.rsplit(".", 1)[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == adapted and len(adapted) >= 8  # two blocks of four or more linear layers each
    assert not hasattr(model, "peft_config")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_scale")


def run(workdir: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    out = workdir / name
    results = fuse_in_process(out, *overrides, f"hydra.run.dir={out}", f"cache_dir={workdir / 'parents'}",
                              f"statistics_dir={workdir / 'statistics'}")
    return out, results


@pytest.mark.parametrize("experiment", ["llama_pydoc_tiny", "vit_digits_tiny"])
def test_lora_finetunes_only_adapters_and_saves_a_plain_model(experiment: str, workdir: Path, monkeypatch):
    import tfuse.pipeline.finetune as stage

    train, trained = stage.train, []

    def spy(model, task, **kw):
        trained.append([n for n, p in model.named_parameters() if p.requires_grad])
        return train(model, task, **kw)

    monkeypatch.setattr(stage, "train", spy)
    out, results = run(workdir, f"{experiment}_lora", f"+experiment={experiment}", "finetune.method=lora",
                       "finetune.steps=4", "finetune.lr=1e-2")
    assert len(trained) == 4 and all(names and all("lora_" in n for n in names) for names in trained)  # OT, VF, both parents
    fused, tuned = load_file(out / "fused" / "model.safetensors"), load_file(out / "finetuned" / "model.safetensors")
    assert tuned.keys() == fused.keys() and not any("lora" in k for k in tuned)
    changed = [k for k in tuned if not torch.equal(tuned[k], fused[k])]
    assert changed and all(".layer" in k and k.endswith(".weight") and tuned[k].ndim == 2 for k in changed)  # the blocks' linears
    assert results["finetuned"]["ot"] != results["one_shot"]["ot"]
    loader = "AutoModelForCausalLM" if experiment.startswith("llama") else "AutoModelForImageClassification"
    model, info = getattr(__import__("transformers"), loader).from_pretrained(out / "finetuned", output_loading_info=True)
    assert not any(info.values()) and all(p.requires_grad for p in model.parameters())


def test_full_is_the_default_and_no_pass_over_a_split_is_repeated(workdir: Path, monkeypatch):
    import tfuse.parents
    from tfuse.config_keys import _compose

    assert _compose([]).finetune.method == "full"
    score, train_parent, passes, training = ImageClassificationTask._score, tfuse.parents.train_parent, [], []

    def counted(self, models, data, weights):
        if not training:  # a parent trained in this run scores itself for its metrics.json
            passes.append((id(data), weights and tuple(weights),
                           tuple(float(sum(p.detach().double().sum() for p in m.parameters())) for m in models)))
        return score(self, models, data, weights)

    def trained(*args, **kw):
        training.append(True)
        try:
            return train_parent(*args, **kw)
        finally:
            training.pop()

    monkeypatch.setattr(ImageClassificationTask, "_score", counted)
    monkeypatch.setattr(tfuse.parents, "train_parent", trained)
    _, results = run(workdir, "vit_full", "+experiment=vit_digits_tiny", "finetune.steps=10", "finetune.eval_every=5",
                     "fusion.anchor=best")
    # test: parents, ensemble, VF, OT, four finetuned; val: the same plus a curve point at step 5 each
    assert len(passes) == len(set(passes)) == 9 + 9 + 4
    for name, curve in results["curves"].items():
        assert [step for step, _ in curve] == [0, 5, 10]
        assert curve[0][1] == results["one_shot_val"][name]["accuracy"]
        assert curve[-1][1] == results["finetuned_val"][name]["accuracy"]
    assert set(results["test_predictions_finetuned"]) == set(results["finetuned"])
