"""The command line end to end on a seconds-scale experiment, and sweeps over its parents (bad
input and `tfuse train`: test_cli_errors.py)."""
import json
from pathlib import Path

import pytest
from transformers import ViTForImageClassification

from conftest import fuse_in_process, tfuse


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> Path:
    out = workdir / "run"
    proc = tfuse("fuse", "+experiment=vit_digits_tiny", "fusion.reg=0.08", f"hydra.run.dir={out}",
                 f"cache_dir={workdir / 'parents'}", cwd=workdir)  # reg: the default, given to show its source
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir / "first_run.stdout").write_text(proc.stdout)
    return out


def test_end_to_end_fusion_writes_results_and_ot_beats_vanilla(first_run: Path, workdir: Path):
    results = json.loads((first_run / "results.json").read_text())
    one_shot = results["one_shot"]
    assert set(one_shot) == {"parent_0", "parent_1", "ensemble", "vanilla", "ot"}
    assert min(one_shot["parent_0"]["accuracy"], one_shot["parent_1"]["accuracy"]) > 0.85
    assert one_shot["ot"]["accuracy"] > one_shot["vanilla"]["accuracy"] + 0.2
    tuned = {"ot", "vanilla", "parent_0", "parent_1"}  # the parents finetuned alike: the controls
    assert set(results["finetuned"]) == tuned and set(results["finetuned_val"]) == tuned
    assert set(results["curves"]) == tuned and [c[0] for c in results["curves"]["ot"]] == [0, 5, 10, 15, 20]
    assert results["curves"]["ot"][0][1] == pytest.approx(results["one_shot_val"]["ot"]["accuracy"])
    assert results["curves"]["ot"][-1][1] == pytest.approx(results["finetuned_val"]["ot"]["accuracy"])
    assert set(results["steps_to_beat_best_parent"]) == tuned
    assert (first_run / "finetune.png").read_bytes().startswith(b"\x89PNG")
    assert set(results["one_shot_val"]) == set(one_shot)  # what settings are selected on
    assert results["one_shot_val"]["ot"]["accuracy"] != one_shot["ot"]["accuracy"] or results["one_shot_val"]["parent_0"] != one_shot["parent_0"]
    assert {"parents", "fuse", "fuse.statistics", "fuse.transport", "finetune_ot"} <= set(results["timings"])
    cost = results["inference"]  # the cost axis of a quality-against-cost curve; the ensemble runs both parents
    assert set(cost) == set(one_shot) and all(c["ms_per_1k_examples"] > 0 for c in cost.values())
    assert cost["ensemble"]["parameters"] == cost["parent_0"]["parameters"] + cost["parent_1"]["parameters"]
    assert cost["ot"]["parameters"] == cost["parent_0"]["parameters"]
    assert results["settings"]["qk"] == "head_aware" and results["settings"]["reg"] == 0.08
    assert (first_run / ".hydra" / "config.yaml").exists()
    fused = ViTForImageClassification.from_pretrained(first_run / "fused")
    from tfuse.data.images import load_images
    from tfuse.tasks.image_classification import ImageClassificationTask

    task = ImageClassificationTask(load_images("digits"))
    assert task.evaluate(fused)["accuracy"] == pytest.approx(one_shot["ot"]["accuracy"])
    assert ViTForImageClassification.from_pretrained(first_run / "finetuned") is not None
    assert len(list((workdir / "parents").iterdir())) == 2


def test_fused_models_carry_a_model_card(first_run: Path, workdir: Path):
    import hashlib

    results = json.loads((first_run / "results.json").read_text())
    card = (first_run / "fused" / "README.md").read_text()
    assert "tfuse fuse +experiment=vit_digits_tiny" in card and "cache_dir=" in card
    for parent in results["parents"]:
        weights = Path(parent["source"]) / "model.safetensors"
        assert f"`{parent['source']}`" in card and hashlib.sha256(weights.read_bytes()).hexdigest() in card
    assert f"accuracy {results['one_shot']['ot']['accuracy']:.4g}" in card and "solver: emd" in card
    tuned = (first_run / "finetuned" / "README.md").read_text()
    assert f"- finetuned: accuracy {results['finetuned']['ot']['accuracy']:.4g}" in tuned


def test_existing_results_are_never_overwritten(first_run: Path, workdir: Path):
    """Refused before anything loads (in-process: the shell's exit 2 is test_cli_errors.py's)."""
    from tfuse.errors import TfuseError

    before = (first_run / "results.json").read_text()
    with pytest.raises(TfuseError, match="already holds results.json"):
        fuse_in_process(first_run, "+experiment=vit_digits_tiny", f"cache_dir={workdir / 'parents'}")
    assert (first_run / "results.json").read_text() == before


def _sweep_first_parents(workdir: Path, name: str, jobs: int, *overrides: str) -> tuple[Path, list[dict]]:
    """A one-shot multirun over the first run's parents; its folder and each job's results."""
    parents = sorted(str(p) for p in (workdir / "parents").iterdir())
    sweep = workdir / name
    proc = tfuse(
        "fuse", "-m", "+experiment=vit_digits_tiny", f"parents=[{parents[0]},{parents[1]}]", "finetune.steps=0",
        *overrides, f"hydra.sweep.dir={sweep}", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep, [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(jobs)]


def test_repair_and_ridge_sweep_from_the_shell(first_run: Path, workdir: Path):
    """Every repair, and a ridge axis: lstsq's second job reuses the first's repair targets."""
    _, runs = _sweep_first_parents(
        workdir, "repair", 6, "fusion.repair=none,rescale,lstsq", "fusion.repair_ridge=0.1,0.0", "fusion.repair_samples=300",
        "fusion.cache_targets=true",
    )
    assert [(r["settings"]["repair"], r["settings"]["repair_ridge"]) for r in runs] == [
        (repair, ridge) for repair in ("none", "rescale", "lstsq") for ridge in (0.1, 0.0)]
    none, lstsqs = runs[0], runs[4:]
    accuracy = lambda r, model, stage="one_shot": r[stage][model]["accuracy"]  # noqa: E731
    for lstsq in lstsqs:
        assert accuracy(lstsq, "ot") > accuracy(none, "ot") - 0.02 and accuracy(lstsq, "ot") > 0.8
        assert accuracy(lstsq, "vanilla") > accuracy(none, "vanilla") + 0.2  # the same repair of the plain average
        assert accuracy(lstsq, "ot", "one_shot_val") > 0.8
        fits = lstsq["repair"]["ot"]
        assert fits["mean_error_after"] < 0.5 * fits["mean_error_before"] and len(fits["layers"]) == 13
    assert "repair" not in none or not none["repair"]
    assert [r["methods"]["ot"]["repair_targets"] for r in lstsqs] == ["computed", "cached"]
    assert [r["methods"]["vanilla"]["repair_targets"] for r in lstsqs] == ["computed", "cached"]
    assert lstsqs[1]["repair"]["ot"]["mean_error_after"] <= lstsqs[0]["repair"]["ot"]["mean_error_after"]  # ridge 0 fits closest


def test_method_sweep_tables_weight_matching_beside_ot(first_run: Path, workdir: Path):
    sweep, (ot, wm) = _sweep_first_parents(workdir, "methods", 2, "fusion.method=ot,weight_matching")
    assert set(ot["one_shot"]) == {"parent_0", "parent_1", "ensemble", "vanilla", "ot"}
    assert set(wm["one_shot"]) == {"parent_0", "parent_1", "ensemble", "vanilla", "weight_matching"}
    assert wm["settings"]["method"] == "weight_matching" and "solver" not in wm["settings"]
    assert wm["methods"]["weight_matching"]["sweeps"][0] >= 1 and "fuse.match" in wm["timings"]
    assert wm["one_shot"]["weight_matching"]["accuracy"] > wm["one_shot"]["vanilla"]["accuracy"]
    proc = tfuse("report", str(sweep), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_csv(sweep / "report.csv")
    assert list(table["fusion.method"]) == ["ot", "weight_matching"]
    assert table["one_shot/weight_matching/accuracy"].notna().tolist() == [False, True]
    assert table["one_shot/ot/accuracy"].notna().tolist() == [True, False]
    # the method's own config group and its knob (in-process: the config as Hydra composes it, which the shell's check accepts)
    from tfuse.config_keys import check_overrides

    group = ["+experiment=vit_digits_tiny", "fusion=weight_matching", "fusion.max_sweeps=1",
             f"parents=[{','.join(ot['parents'][i]['source'] for i in range(2))}]", "finetune.steps=0"]
    check_overrides(group)
    results = fuse_in_process(workdir / "wm_group", *group, f"statistics_dir={workdir / 'stats'}")
    assert results["methods"]["weight_matching"]["sweeps"] == [1]


def test_seed_pairs_and_reg_sweep_and_report_mean_std(first_run: Path, workdir: Path):
    """``parent_seeds`` as a sweep axis (the cached seeds, in both orders) beside a setting's axis:
    `tfuse report` tables every run and groups the seeds per setting."""
    sweep = workdir / "seeds"
    proc = tfuse(
        "fuse", "-m", "+experiment=vit_digits_tiny", "parent_seeds=[0,1],[1,0]", "fusion.solver=sinkhorn", "fusion.reg=0.01,0.1",
        "finetune.steps=0", f"cache_dir={workdir / 'parents'}", f"hydra.sweep.dir={sweep}", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]
    assert [[p["seed"] for p in r["parents"]] for r in runs] == [[0, 1], [0, 1], [1, 0], [1, 0]]
    assert [r["settings"]["reg"] for r in runs] == [0.01, 0.1, 0.01, 0.1]
    assert all(p["trained_seconds"] == 0 for r in runs for p in r["parents"])  # the first run's cache
    assert runs[1]["methods"]["ot"]["statistics"] == runs[3]["methods"]["ot"]["statistics"] == ["cached"]  # from outputs/cache
    assert all(r["finetuned"] == {} for r in runs)
    assert not (sweep / "0" / "finetuned").exists() and (sweep / "0" / "fused").is_dir()
    proc = tfuse("report", str(sweep), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    csv = (sweep / "report.csv").read_text()
    assert "fusion.reg" in csv and len(csv.strip().splitlines()) == 5
    assert (sweep / "report.png").read_bytes().startswith(b"\x89PNG")
    import pandas as pd

    seeds = pd.read_csv(sweep / "seeds.csv")
    assert list(seeds["fusion.reg"]) == [0.01, 0.1] and list(seeds["runs"]) == [2, 2]
    for row, reg in enumerate((0.01, 0.1)):
        ot = [r["one_shot"]["ot"]["accuracy"] for r in runs if r["settings"]["reg"] == reg]
        assert seeds["one_shot/ot/accuracy/mean"][row] == pytest.approx(sum(ot) / 2)
    assert "mean +- std over seeds" in proc.stdout


def test_distilled_finetune_from_the_shell(first_run: Path, workdir: Path):
    out = workdir / "distilled"
    proc = tfuse("fuse", "+experiment=vit_digits_tiny", "finetune.teacher=ensemble", "finetune.kd_weight=0.7",
                 f"cache_dir={workdir / 'parents'}", f"hydra.run.dir={out}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads((first_run / "results.json").read_text())
    distilled = json.loads((out / "results.json").read_text())
    assert distilled["one_shot"] == plain["one_shot"]  # only the finetune differs
    assert set(distilled["finetuned"]) == set(plain["finetuned"])
    assert distilled["finetuned"]["ot"] != plain["finetuned"]["ot"] and distilled["finetuned"]["parent_0"] != plain["finetuned"]["parent_0"]


def test_parents_without_an_experiment_say_whose_settings_apply(workdir: Path):
    parents = f"parents=[{workdir / 'a'},{workdir / 'b'}]"
    for given, name in (([], "vit_mnist"), (["model=hf_bert"], "bert_mlm")):
        proc = tfuse("fuse", *given, parents, "fusion.solver=sinkhorn", "--cfg", "job", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        line = f"parents=[...] without +experiment: fusing with {name}'s settings ("
        assert line in proc.stderr and "pass +experiment=NAME to choose" in proc.stderr
        assert "fusion.solver" not in proc.stderr  # the command line's own settings are not the experiment's
    proc = tfuse("fuse", "+experiment=vit_digits_tiny", parents, "--cfg", "job", cwd=workdir)
    assert proc.returncode == 0 and "without +experiment" not in proc.stderr


def test_the_summary_names_each_fusion_settings_source(first_run: Path, workdir: Path):
    """After the table (on one line, printed to a pipe): the settings by source, the command line's
    marked as such; results.json ``fusion_settings`` the same."""
    lines = (workdir / "first_run.stdout").read_text().splitlines()
    assert "tfuse: one-shot and finetuned (VF: vanilla fusion, OT: OT fusion)" in lines
    assert any("one-shot accuracy" in line and "one-shot loss" in line for line in lines)  # one-line headers
    summary = lines[lines.index("fusion settings in force, by source:"):]
    assert summary[1] == "  command line: reg=0.08"
    assert summary[2].startswith("  experiment vit_digits_tiny: samples=100 ") and "solver=emd" in summary[2]
    assert summary[3].startswith("  package defaults: method=ot ")
    found = json.loads((first_run / "results.json").read_text())["fusion_settings"]
    assert found["reg"] == {"value": 0.08, "source": "command line"}
    assert found["qk"] == {"value": "head_aware", "source": "experiment vit_digits_tiny"}
    assert found["cost"] == {"value": "activations", "source": "package defaults"}
