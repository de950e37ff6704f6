"""`tfuse report`: tables, markdown, CSV and plot from fabricated Hydra multirun folders."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console
from scipy import stats

from tfuse.errors import TfuseError
from tfuse.report import build_report, mcnemar, over_seeds, parse_override, run_report, shard_scores

PNG_MAGIC = b"\x89PNG"


def make_job(root: Path, index: int, overrides: list[str], results: dict) -> None:
    """One numbered job folder with results.json and .hydra/overrides.yaml."""
    job = root / str(index)
    (job / ".hydra").mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def scores(accuracy: float, finetuned: bool = True) -> dict:
    """A results.json payload whose ot accuracy is ``accuracy``."""
    offsets = {"parent_0": 0.05, "parent_1": 0.04, "ensemble": 0.06, "vanilla": -0.3, "ot": 0.0}
    one_shot = {model: {"accuracy": accuracy + offset, "loss": 1.0 - accuracy} for model, offset in offsets.items()}
    tuned = {"ot": {"accuracy": accuracy + 0.02, "loss": 0.2}, "vanilla": {"accuracy": 0.8, "loss": 1 / 3}}
    return {"one_shot": one_shot, "finetuned": tuned if finetuned else {}, "timings": {"fuse": 3.4}, "settings": {}}


REGS = [0.02, 0.05, 0.08, 0.12]


@pytest.fixture
def reg_sweep(tmp_path: Path) -> Path:
    """fusion.reg swept over 4 jobs (written out of order) with a fixed solver and experiment."""
    root = tmp_path / "multirun" / "12-00-00"
    for index, reg in reversed(list(enumerate(REGS))):
        overrides = ["+experiment=vit_mnist", "fusion.solver=sinkhorn", f"fusion.reg={reg}"]
        make_job(root, index, overrides, scores(0.9 - reg))
    return root


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    """A 2x2 sweep of fusion.solver x fusion.reg."""
    root = tmp_path / "grid"
    jobs = [("sinkhorn", 0.05), ("emd", 0.05), ("sinkhorn", 0.1), ("emd", 0.1)]
    for index, (solver, reg) in enumerate(jobs):
        overrides = ["+experiment=vit_mnist", f"fusion.solver={solver}", f"fusion.reg={reg}"]
        make_job(root, index, overrides, scores(0.8 + reg, finetuned=solver == "emd"))
    return root


def quiet() -> Console:
    """A console that prints nowhere."""
    return Console(file=io.StringIO(), width=200)


def test_reg_sweep_csv_has_one_row_per_run_sorted(reg_sweep: Path) -> None:
    paths = run_report(str(reg_sweep), console=quiet())
    table = pd.read_csv(paths["csv"])
    assert list(table.columns[:2]) == ["run", "fusion.reg"]
    assert table["fusion.reg"].tolist() == REGS
    assert table["run"].tolist() == [0, 1, 2, 3]
    assert table["one_shot/ot/accuracy"].tolist() == pytest.approx([0.9 - reg for reg in REGS])
    assert table["finetuned/ot/accuracy"].tolist() == pytest.approx([0.92 - reg for reg in REGS])
    assert "fusion.solver" not in table and "experiment" not in table and "timings/fuse" not in table


def test_reg_sweep_markdown_and_png(reg_sweep: Path) -> None:
    paths = run_report(str(reg_sweep), console=quiet())
    assert set(paths) == {"md", "csv", "png"}
    assert all(path.parent == reg_sweep for path in paths.values())
    markdown = paths["md"].read_text().splitlines()
    assert markdown[0].startswith("| run | fusion.reg | one_shot/parent_0/accuracy |")
    assert "| 0 | 0.02 | 0.93 |" in markdown[2]
    assert markdown[5].endswith("| 0.8 | 0.3333 |")  # finetuned vanilla, 4 significant digits
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert not list(reg_sweep.glob("*.tmp"))


def test_rerun_overwrites_reports(reg_sweep: Path) -> None:
    first = run_report(str(reg_sweep), console=quiet())["md"].read_text()
    assert run_report(str(reg_sweep), console=quiet())["md"].read_text() == first


def test_grid_sweep_keeps_both_params_and_plots_per_solver(grid_sweep: Path) -> None:
    report = build_report(grid_sweep)
    assert report.params == ["fusion.solver", "fusion.reg"]
    assert report.table[["fusion.solver", "fusion.reg"]].values.tolist() == [
        ["emd", 0.05], ["emd", 0.1], ["sinkhorn", 0.05], ["sinkhorn", 0.1]
    ]
    assert report.table["finetuned/ot/accuracy"].isna().tolist() == [False, False, True, True]
    paths = run_report(str(grid_sweep), console=quiet())
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)


def test_categorical_sweep_has_no_plot(tmp_path: Path) -> None:
    for index, solver in enumerate(["emd", "sinkhorn"]):
        make_job(tmp_path, index, [f"fusion.solver={solver}"], scores(0.9))
    assert set(run_report(str(tmp_path), console=quiet())) == {"md", "csv"}


def test_metrics_are_not_hard_coded(tmp_path: Path) -> None:
    mlm = {"ot": {"loss": 2.0, "perplexity": 7.4, "masked_accuracy": 0.41}}
    for index, reg in enumerate([0.01, 0.1]):
        make_job(tmp_path, index, [f"fusion.reg={reg}"], {"one_shot": mlm})
    report = build_report(tmp_path)
    assert report.metrics == ["loss", "perplexity", "masked_accuracy"]
    assert report.metric == "loss"
    assert build_report(tmp_path, "perplexity").metric == "perplexity"


def test_single_run_keeps_all_overrides(tmp_path: Path) -> None:
    make_job(tmp_path, 0, ["+experiment=vit_mnist", "fusion.reg=1e-3"], scores(0.9))
    report = build_report(tmp_path / "0")
    assert report.params == ["experiment", "fusion.reg"]
    assert report.table.loc[0, "fusion.reg"] == 0.001
    assert report.table.loc[0, "run"] == "."
    assert set(run_report(str(tmp_path / "0"), console=quiet())) == {"md", "csv"}  # one point: no plot


def test_terminal_table_shows_chosen_metric(reg_sweep: Path) -> None:
    console = Console(record=True, width=300)
    run_report(str(reg_sweep), metric="loss", console=console)
    text = console.export_text()
    assert ": loss" in text and "parent_0" in text and "fusion.reg" in text and "0.3333" in text
    assert "accuracy" not in text


def test_no_results_names_directory(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    with pytest.raises(TfuseError, match=str(tmp_path)):
        build_report(tmp_path)
    with pytest.raises(TfuseError, match="no such directory"):
        build_report(tmp_path / "missing")


def test_unknown_metric_lists_available(reg_sweep: Path) -> None:
    with pytest.raises(TfuseError, match="bleu.*available metrics: accuracy, loss"):
        build_report(reg_sweep, metric="bleu")


def test_broken_results_json_names_file(tmp_path: Path) -> None:
    make_job(tmp_path, 0, [], {})
    (tmp_path / "0" / "results.json").write_text("{not json")
    with pytest.raises(TfuseError, match="results.json"):
        build_report(tmp_path)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("fusion.reg=0.02", ("fusion.reg", 0.02)),
        ("+experiment=vit_mnist", ("experiment", "vit_mnist")),
        ("train.epochs=3", ("train.epochs", 3)),
        ("fusion.reg=1e-3", ("fusion.reg", 0.001)),
        ("model.layers=[1,2]", ("model.layers", "[1,2]")),
        ("~fusion.reg", None),
    ],
)
def test_parse_override(item: str, expected: tuple | None) -> None:
    assert parse_override(item) == expected


def test_runs_differing_only_in_seeds_are_grouped_with_mean_std_and_count(tmp_path: Path):
    """2 settings x 3 parent seed pairs (plus a run seed on one): mean, sample std, count, and
    the paired OT - VF difference, on the test and the validation split."""
    root = tmp_path / "seeds"
    ot = {0.01: [0.70, 0.74, 0.78], 0.1: [0.60, 0.61, 0.65]}
    vf = {0.01: [0.40, 0.50, 0.42], 0.1: [0.40, 0.50, 0.42]}
    index = 0
    for reg in ot:
        for k, pair in enumerate(["[0,1]", "[2,3]", "[4,5]"]):
            results = scores(ot[reg][k])
            results["one_shot"]["vanilla"]["accuracy"] = vf[reg][k]
            results["one_shot_val"] = {"ot": {"accuracy": ot[reg][k] - 0.01}, "vanilla": {"accuracy": vf[reg][k]}}
            results["inference"] = {"ot": {"parameters": 1000, "ms_per_1k_examples": 5.0 + k},
                                    "ensemble": {"parameters": 2000, "ms_per_1k_examples": 10.0 + k}}
            make_job(root, index, ["+experiment=vit_mnist", f"fusion.reg={reg}", f"parent_seeds={pair}"], results)
            index += 1
    paths = run_report(str(root), console=quiet())
    table = pd.read_csv(paths["seeds_csv"])
    assert list(table["fusion.reg"]) == [0.01, 0.1] and list(table["runs"]) == [3, 3]
    for i, reg in enumerate(ot):
        expect = pd.Series(ot[reg])
        assert table.loc[i, "one_shot/ot/accuracy/mean"] == pytest.approx(expect.mean())
        assert table.loc[i, "one_shot/ot/accuracy/std"] == pytest.approx(expect.std(ddof=1))
        paired = expect - pd.Series(vf[reg])
        assert table.loc[i, "one_shot/ot-vanilla/accuracy/mean"] == pytest.approx(paired.mean())
        assert table.loc[i, "one_shot/ot-vanilla/accuracy/std"] == pytest.approx(paired.std(ddof=1))
        assert table.loc[i, "one_shot_val/ot/accuracy/mean"] == pytest.approx(expect.mean() - 0.01)
        assert table.loc[i, "inference/ot/ms_per_1k_examples/mean"] == pytest.approx(6.0)  # the cost axis
        assert table.loc[i, "inference/ensemble/parameters/mean"] == 2000
    markdown = paths["seeds_md"].read_text()
    assert "0.74 +- 0.04" in markdown and "| runs |" in markdown
    assert len(pd.read_csv(paths["csv"])) == 6  # the per-run table is unchanged


def test_a_sweep_without_seed_axes_writes_no_seed_report(reg_sweep: Path):
    paths = run_report(str(reg_sweep), console=quiet())
    assert "seeds_csv" not in paths and not (reg_sweep / "seeds.csv").exists()


def test_select_val_picks_by_validation_and_shows_the_optimism_of_picking_on_test(tmp_path: Path):
    """reg 0.01 is best on validation, reg 0.1 on test (by luck of the split): --select val
    reports 0.01's test score and the gap to the test-best."""
    root = tmp_path / "select"
    val = {0.01: [0.80, 0.82], 0.1: [0.75, 0.77]}
    test = {0.01: [0.70, 0.72], 0.1: [0.74, 0.76]}
    index = 0
    for reg in val:
        for k, pair in enumerate(["[0,1]", "[2,3]"]):
            results = scores(test[reg][k])
            results["one_shot_val"] = {"ot": {"accuracy": val[reg][k], "loss": 1 - val[reg][k]}}
            make_job(root, index, ["+experiment=vit_mnist", f"fusion.reg={reg}", f"parent_seeds={pair}"], results)
            index += 1
    run_report(str(root), console=quiet(), select="val")
    chosen = (root / "select.md").read_text()
    assert "fusion.reg=0.01" in chosen.splitlines()[2].split("|")[4]
    row = chosen.splitlines()[2].split("|")
    assert row[1].strip() == "one_shot" and float(row[6]) == pytest.approx(0.71)  # its test
    assert "fusion.reg=0.1" in row[8] and float(row[9]) == pytest.approx(0.75) and float(row[10]) == pytest.approx(0.04)
    run_report(str(root), console=quiet(), select="val", metric="loss")  # lower is better for a loss
    row = (root / "select.md").read_text().splitlines()[2].split("|")
    assert "fusion.reg=0.01" in row[4] and float(row[10]) == pytest.approx(0.04)


def test_select_val_without_validation_scores_is_a_clear_error(reg_sweep: Path):
    with pytest.raises(TfuseError, match="no validation scores"):
        run_report(str(reg_sweep), console=quiet(), select="val")


def test_non_iid_runs_pool_partition_seeds_and_show_own_and_rest(tmp_path: Path):
    """partition.seed is a seed axis; by_shard becomes own/rest columns, mean +- std per model."""
    for seed, own in enumerate([0.90, 0.92, 0.94]):
        results = scores(0.8)
        results["by_shard"] = {"ot": [{"own": own, "rest": 0.7}, {"own": 0.8, "rest": None}]}
        results["by_shard_finetuned"] = {"ot": [{"own": 0.95, "rest": 0.9}, {"own": 0.9, "rest": 0.95}]}
        make_job(tmp_path, seed, ["fusion.repair_targets=label", f"partition.seed={seed}"], results)
    report = build_report(tmp_path)
    assert report.table["one_shot/ot/own_0"].tolist() == pytest.approx([0.90, 0.92, 0.94])
    assert "one_shot/ot/rest_1" not in report.table  # no test image of the rest: not a zero
    assert len(over_seeds(report)) == 1
    console = Console(file=io.StringIO(), width=200)
    paths = run_report(str(tmp_path), console=console)
    assert "own classes and on the rest" in console.file.getvalue()
    shards = paths["shards_md"].read_text().splitlines()
    assert shards[0] == "| stage | model | runs | own 0 | rest 0 | own 1 | rest 1 |"
    assert shards[2] == "| one_shot | ot | 3 | 92.0 +- 2.0 | 70.0 +- 0.0 | 80.0 +- 0.0 |  |"
    assert shards[3] == "| finetuned | ot | 3 | 95.0 +- 0.0 | 90.0 +- 0.0 | 90.0 +- 0.0 | 95.0 +- 0.0 |"
    assert shard_scores(build_report(tmp_path / "0")) is not None  # one run: means alone


def test_a_run_without_shards_has_no_shard_table(reg_sweep: Path):
    assert shard_scores(build_report(reg_sweep)) is None
    assert "shards_md" not in run_report(str(reg_sweep), console=quiet())


def test_mcnemar_counts_only_the_examples_one_model_gets_right():
    labels = [0] * 20
    # 10 examples only the first gets right, 1 only the second, 9 both
    first = [0] * 19 + [1]
    second = [1] * 10 + [0] * 10
    assert mcnemar(labels, first, second) == pytest.approx(stats.binomtest(10, 11, 0.5).pvalue)
    assert mcnemar(labels, first, second) == pytest.approx(24 / 2048)  # two-sided: 2 * (1 + 11) / 2 ** 11
    assert mcnemar(labels, first, first) == 1.0
    with pytest.raises(TfuseError, match="differ in length"):
        mcnemar(labels, first[:5], second)
