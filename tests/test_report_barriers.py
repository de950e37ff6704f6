"""`tfuse report` on runs with interpolation curves: barrier columns per run and over seeds, and
barriers.png; runs without them report as before."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from test_report import PNG_MAGIC, make_job, quiet, scores
from tfuse.report import build_report, interpolation_bands, over_seeds, run_report

LAMBDAS = [0.0, 0.5, 1.0]
PAIRS = ["[0,1]", "[2,3]", "[4,5]"]
OT_BARRIERS = [0.1, 0.2, 0.3]
VF_BARRIERS = [0.5, 0.7, 0.9]


def method(barriers: dict[str, float], losses: dict[str, list[float]], midpoint: float) -> dict:
    """One method's interpolation entry: loss (and accuracy) curves and barriers per non-anchor parent."""
    return {
        "curves": {parent: {"loss": loss, "accuracy": [0.9] * len(loss)} for parent, loss in losses.items()},
        "barrier": barriers,
        "barrier_at_half": {parent: value / 2 for parent, value in barriers.items()},
        "midpoint_barrier": midpoint,
        "repaired": True,
    }


def with_interpolation(k: int, lambdas: list[float] = LAMBDAS) -> dict:
    """Seed pair ``k``'s results: ot and vanilla barriers of that pair, loss curves shifted by 0.1 k."""
    results = scores(0.8)
    results["one_shot_val"] = {"ot": {"accuracy": 0.79}}
    shift = 0.1 * k
    results["interpolation"] = {"split": "test", "metric": "loss", "lambdas": lambdas, "methods": {
        "ot": method({"parent_1": OT_BARRIERS[k]}, {"parent_1": [1.0 + shift, 1.5 + shift, 1.2 + shift][:len(lambdas)]},
                     0.01 * k),
        "vanilla": method({"parent_1": VF_BARRIERS[k]}, {"parent_1": [1.0 + shift, 3.0 + shift, 1.2 + shift][:len(lambdas)]},
                          0.5),
    }}
    return results


@pytest.fixture
def seed_sweep(tmp_path: Path) -> Path:
    """Three parent seed pairs of one setting, each with interpolation curves."""
    for k, pair in enumerate(PAIRS):
        make_job(tmp_path, k, ["+experiment=vit_mnist", f"parent_seeds={pair}"], with_interpolation(k))
    return tmp_path


def test_seeds_table_has_barrier_mean_and_sample_std(seed_sweep: Path):
    paths = run_report(str(seed_sweep), console=quiet())
    seeds = pd.read_csv(paths["seeds_csv"])
    assert seeds["runs"].tolist() == [3]
    # 0.1, 0.2, 0.3: mean 0.2, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1 (0.0816 with ddof=0)
    assert seeds.loc[0, "barrier/ot/mean"] == pytest.approx(0.2)
    assert seeds.loc[0, "barrier/ot/std"] == pytest.approx(0.1)
    assert seeds.loc[0, "barrier_at_half/ot/mean"] == pytest.approx(0.1)
    assert seeds.loc[0, "barrier_at_half/ot/std"] == pytest.approx(0.05)
    assert seeds.loc[0, "midpoint_barrier/ot/mean"] == pytest.approx(0.01)
    assert seeds.loc[0, "midpoint_barrier/ot/std"] == pytest.approx(0.01)
    assert seeds.loc[0, "barrier/vanilla/mean"] == pytest.approx(0.7)
    assert seeds.loc[0, "barrier/vanilla/std"] == pytest.approx(0.2)
    assert seeds.loc[0, "midpoint_barrier/vanilla/std"] == pytest.approx(0.0)
    runs = pd.read_csv(paths["csv"])
    assert runs["barrier/ot"].tolist() == pytest.approx(OT_BARRIERS)
    barriers = [column for column in runs.columns if "barrier" in column]
    assert barriers == ["barrier/ot", "barrier/vanilla", "barrier_at_half/ot", "barrier_at_half/vanilla",
                        "midpoint_barrier/ot", "midpoint_barrier/vanilla"]  # after the stage columns
    assert runs.columns.get_loc("barrier/ot") > runs.columns.get_loc("one_shot_val/ot/accuracy")
    assert "0.2 +- 0.1" in paths["seeds_md"].read_text()


def test_barriers_are_not_metrics(seed_sweep: Path):
    """Metric choice and selection by validation see only the stages' metrics."""
    report = build_report(seed_sweep)
    assert report.metrics == ["accuracy", "loss"] and report.metric == "accuracy"
    paths = run_report(str(seed_sweep), console=quiet(), select="val")
    row = paths["select_md"].read_text().splitlines()[2].split("|")
    assert row[1].strip() == "one_shot" and float(row[5]) == pytest.approx(0.79)


def test_printed_tables_show_the_barriers(seed_sweep: Path):
    console = Console(record=True, width=400)
    run_report(str(seed_sweep), console=console)
    text = console.export_text()
    assert "midpoint_barrier" in text and "barrier_at_half" in text
    assert "0.2 +- 0.1" in text  # barrier/ot over the seeds
    assert "0.7 +- 0.2" in text  # barrier/vanilla


def test_two_non_anchor_parents_are_averaged(tmp_path: Path):
    results = scores(0.8)
    results["interpolation"] = {"split": "test", "metric": "loss", "lambdas": LAMBDAS, "methods": {
        "ot": method({"parent_1": 0.1, "parent_2": 0.4}, {"parent_1": [1.0, 2.0, 1.0], "parent_2": [3.0, 5.0, 4.0]}, 0.05),
    }}
    make_job(tmp_path, 0, ["+experiment=vit_mnist"], results)
    report = build_report(tmp_path)
    assert report.table.loc[0, "barrier/ot"] == pytest.approx(0.25)
    assert report.table.loc[0, "barrier_at_half/ot"] == pytest.approx(0.125)
    assert report.table.loc[0, "midpoint_barrier/ot"] == pytest.approx(0.05)
    assert report.interpolation["loss"].tolist() == pytest.approx([2.0, 3.5, 2.5])
    bands = interpolation_bands(report)
    assert bands["std"].isna().all()  # one run: no spread
    assert bands["line"].tolist() == pytest.approx([2.0, 2.25, 2.5])


def test_barriers_png_and_its_bands(seed_sweep: Path):
    paths = run_report(str(seed_sweep), console=quiet())
    assert paths["barriers_png"] == seed_sweep / "barriers.png"
    assert paths["barriers_png"].read_bytes().startswith(PNG_MAGIC)
    assert not list(seed_sweep.glob("*.tmp")) and not list(seed_sweep.glob(".*.tmp"))
    bands = interpolation_bands(build_report(seed_sweep))
    assert bands["method"].tolist() == ["ot"] * 3 + ["vanilla"] * 3
    assert bands["lambda"].tolist() == LAMBDAS * 2
    # curves shifted by 0, 0.1, 0.2: mean at the middle of the three, sample std 0.1 everywhere
    assert bands["mean"].tolist() == pytest.approx([1.1, 1.6, 1.3, 1.1, 3.1, 1.3])
    assert bands["std"].tolist() == pytest.approx([0.1] * 6)
    assert bands["line"].tolist() == pytest.approx([1.1, 1.2, 1.3] * 2)  # between the mean endpoints


def test_runs_with_other_lambdas_are_left_out_of_the_curves(tmp_path: Path):
    make_job(tmp_path, 0, ["parent_seeds=[0,1]"], with_interpolation(0))
    make_job(tmp_path, 1, ["parent_seeds=[2,3]"], with_interpolation(1, lambdas=[0.0, 1.0]))
    make_job(tmp_path, 2, ["parent_seeds=[4,5]"], with_interpolation(2))
    report = build_report(tmp_path)
    assert report.interpolation["run"].unique().tolist() == ["0", "2"]
    assert report.table["barrier/ot"].tolist() == pytest.approx(OT_BARRIERS)  # barriers need no alignment
    assert interpolation_bands(report)["mean"].tolist()[:3] == pytest.approx([1.1, 1.6, 1.3])
    assert run_report(str(tmp_path), console=quiet())["barriers_png"].read_bytes().startswith(PNG_MAGIC)


def test_runs_without_interpolation_report_as_before(tmp_path: Path):
    for k, pair in enumerate(PAIRS):
        make_job(tmp_path, k, ["+experiment=vit_mnist", f"parent_seeds={pair}"], scores(0.8 + 0.01 * k))
    report = build_report(tmp_path)
    models = ["parent_0", "parent_1", "ensemble", "vanilla", "ot"]
    stages = [f"one_shot/{model}/{metric}" for model in models for metric in ("accuracy", "loss")]
    stages += [f"finetuned/{model}/{metric}" for model in ("ot", "vanilla") for metric in ("accuracy", "loss")]
    assert list(report.table.columns) == ["run", "parent_seeds", *stages]
    assert report.interpolation.empty and interpolation_bands(report) is None
    assert not any("barrier" in column for column in over_seeds(report).columns)
    paths = run_report(str(tmp_path), console=quiet())
    assert set(paths) == {"md", "csv", "seeds_md", "seeds_csv"}
    assert not (tmp_path / "barriers.png").exists()
