"""eval.lm_eval: lm-evaluation-harness scores every model of a causal-LM fusion on a local task
(configs/lm_eval/plays_cloze.yaml), offline, and its numbers are lm-eval's own on the saved models."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import fuse_in_process
from tfuse.arch import hf_llama
from tfuse.data.tokenizer import train_bpe
from tfuse.errors import TfuseError
from tfuse.pipeline.harness import Harness, NotScored, language_model
from tfuse.symmetry import symmetric_copy

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install -e '.[lmeval]'")
TASKS = Path(__file__).parents[1] / "configs" / "lm_eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 8  # items of plays_cloze scored per model


def llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    return hf_llama.attach_tokenizer(model, tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    from pydoc_data.topics import topics

    return train_bpe(sorted(topics.values())[:200], 300)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> Path:
    """A LLaMA and a signed symmetric copy of it, fused by hard OT (the original comes back), then
    finetuned one step; every model scored on plays_cloze."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = llama(tokenizer, 0)
    twin = symmetric_copy(model, hf_llama.graph(model), seed=1, signs=True)
    hf_llama.save(model, str(root / "a"))
    hf_llama.save(twin, str(root / "b"))
    with pytest.MonkeyPatch.context() as env:
        for key, value in OFFLINE.items():
            env.setenv(key, value)
        fuse_in_process(root / "run", f"parents=[{root / 'a'},{root / 'b'}]", "data=pydoc", "fusion.solver=emd",
                        "fusion.repair=none", "fusion.signs=true", "fusion.samples=16", "fusion.batch_size=8",
                        "data.max_length=24", "data.max_train=40", "data.max_eval=16", "eval_batch_size=16",
                        "finetune.steps=1", "finetune.batch_size=8", "finetune.controls=none", "device=cpu",
                        "eval.lm_eval.tasks=[plays_cloze]", f"eval.lm_eval.include_path={TASKS}",
                        f"eval.lm_eval.limit={LIMIT}", f"cache_dir={root / 'cache'}",
                        f"statistics_dir={root / 'stats'}")
    return root


def direct(path: Path) -> dict:
    """lm-eval on a saved checkpoint directory, as a user would run it."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(path), batch_size=16, device="cpu")
    found = lm_eval.simple_evaluate(model=lm, tasks=["plays_cloze"], limit=LIMIT, log_samples=False,
                                    task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    return {key.removesuffix(",none"): float(v) for key, v in found["results"]["plays_cloze"].items()
            if "," in key and isinstance(v, (int, float))}


def assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for metric in a:
        assert a[metric] == pytest.approx(b[metric], abs=tol), metric


@needs_lm_eval
def test_every_model_is_scored_and_the_numbers_are_lm_evals_own_on_the_saved_models(run: Path):
    found = json.loads((run / "run" / "results.json").read_text())["lm_eval"]
    assert found["tasks"] == ["plays_cloze"] and found["limit"] == LIMIT and not found["not_applicable"]
    assert set(found["one_shot"]) == {"parent_0", "parent_1", "ensemble", "vanilla", "ot"}
    assert set(found["finetuned"]) == {"vanilla", "ot"}
    scores = {(stage, name): tasks["plays_cloze"] for stage in ("one_shot", "finetuned")
              for name, tasks in found[stage].items()}
    for score in scores.values():
        assert {"acc", "acc_norm", "brier_score"} <= set(score)
        assert 0 <= score["acc"] <= 1 and 0 <= score["acc_norm"] <= 1 and score["brier_score"] >= 0
    parent = scores["one_shot", "parent_0"]
    # the parent, the fused and the finetuned models scored in memory = lm-eval on their directories
    assert_same(parent, direct(run / "a"))
    assert_same(scores["one_shot", "ot"], direct(run / "run" / "fused"))
    assert_same(scores["finetuned", "ot"], direct(run / "run" / "finetuned"))
    # a symmetric copy, an ensemble of two equal functions and their hard-OT fusion score as the parent
    for name in ("parent_1", "ensemble", "ot"):
        assert_same(scores["one_shot", name], parent, 1e-5)
    # the plain average of the unaligned copies is another model, and lm-eval tells it apart
    assert abs(scores["one_shot", "vanilla"]["brier_score"] - parent["brier_score"]) > 1e-3


@needs_lm_eval
def test_the_ensemble_mixes_the_members_token_probabilities(tokenizer):
    """lm-eval's loglikelihood of a continuation under the ensemble: the sum over its tokens of the
    log of the members' mean probability, from the members' own logits."""
    from lm_eval.api.instance import Instance

    a, b = llama(tokenizer, 0), llama(tokenizer, 2)
    context, continuation = "Thou, Julia, thou hast metamorphosed me,", "\nMade me neglect my studies"
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        token_lp = [torch.log_softmax(m(torch.tensor([whole])).logits[0, :-1], -1) for m in (a, b)]
    picked = [lp[torch.arange(start - 1, len(whole) - 1), whole[start:]] for lp in token_lp]
    request = [Instance("loglikelihood", {}, (context, continuation), 0)]
    for members, expected in (([a], picked[0].sum()),
                              ([a, b], (torch.logsumexp(torch.stack(picked), 0) - math.log(2)).sum())):
        (got, _), = language_model(members, 4).loglikelihood(request, disable_tqdm=True)
        assert got == pytest.approx(float(expected), abs=1e-5)
    assert float(picked[0].sum()) != pytest.approx(float(picked[1].sum()), abs=1e-3)  # the members differ
    with pytest.raises(NotScored, match="loglikelihood tasks only"):  # it has no generate(): never parent 0's
        language_model([a, b], 4).generate_until([Instance("generate_until", {}, (context, {}), 0)])


def config(**lm_eval):
    return OmegaConf.create({"model": {"family": "hf_llama"},
                             "eval": {"lm_eval": {"tasks": ["plays_cloze"], **lm_eval}}})


@needs_lm_eval
def test_bad_settings_are_refused_in_one_line(monkeypatch):
    assert Harness.from_config(config(tasks=[])) is None
    for cfg, says in (
        (OmegaConf.merge(config(), {"model": {"family": "hf_bert"}}),
         "eval.lm_eval scores causal LMs; model.family=hf_bert"),
        (config(limit=0), "eval.lm_eval.limit=0"),
        (config(batch_size=0), "eval.lm_eval.batch_size=0"),
        (config(include_path="/no/such/folder"), "eval.lm_eval.include_path=/no/such/folder: no such folder"),
    ):
        with pytest.raises(TfuseError, match=says) as err:
            Harness.from_config(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(TfuseError, match=f"no_such_task not found in {TASKS} or among lm-eval's tasks") as err:
        Harness.from_config(config(tasks=["plays_cloze", "no_such_task"], include_path=str(TASKS)))
    assert "\n" not in str(err.value)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find(name, *a))
    with pytest.raises(TfuseError, match=r"not installed: pip install -e '\.\[lmeval\]'"):
        Harness.from_config(config(include_path=str(TASKS)))


def test_the_shipped_items_are_the_ones_the_script_builds():
    """plays_cloze.jsonl is what plays_cloze.py writes: in each item the right choice is the line the
    speaker says after the context, in the play's text, and the others are not."""
    from tfuse.data.corpora import read_plays

    spec = importlib.util.spec_from_file_location("plays_cloze", TASKS / "plays_cloze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = [json.loads(line) for line in (TASKS / "plays_cloze.jsonl").read_text().splitlines()]
    assert shipped == module.items() and len(shipped) == 48
    plays = {play.name: play.text for play in read_plays()}
    for item in shipped:
        follows = [f"{item['context']}\n{choice}" in plays[item["play"]] for choice in item["choices"]]
        assert follows == [i == item["gold"] for i in range(len(follows))]
