"""Ablation presets: `+ablation=NAME` sets Hydra's sweep so one command runs one paper table."""
import itertools
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import tfuse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "ablation").glob("*.yaml"))
SEED_PAIRS = ["[0,1]", "[2,3]", "[4,5]"]


def jobs(name: str) -> list[dict[str, str]]:
    """The jobs a multirun of the preset launches: Hydra's own parser expands its sweep."""
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["+experiment=vit_mnist", f"+ablation={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [(o.get_key_element(), str(v)) for v in o.sweep_string_iterator()] if o.is_sweep_override()
        else [(o.get_key_element(), o.get_value_element_as_str())]
        for o in parsed
    ]
    assert cfg.finetune.steps == 0  # one-shot tables
    return [dict(combo) for combo in itertools.product(*axes)]


def test_every_paper_table_has_a_preset():
    assert {"reg", "residual", "qk", "tokens", "samples", "cost", "n_parents", "repair"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_crosses_its_table_with_three_seed_draws(name):
    expanded = jobs(name)
    seeds = {job.get("parent_seeds", job.get("seed")) for job in expanded}
    assert len(seeds) == 3 and len({tuple(sorted(j.items())) for j in expanded}) == len(expanded)
    others = {k for job in expanded for k in job} - {"parent_seeds", "seed"}
    assert len(expanded) == 3 * math.prod(len({job[k] for job in expanded}) for k in others)


def test_the_reg_preset_expands_to_cost_x_reg_x_seed_pairs():
    expanded = jobs("reg")
    assert len(expanded) == 2 * 6 * 3
    assert {job["fusion.reg"] for job in expanded} == {"0.005", "0.01", "0.02", "0.04", "0.08", "0.15"}
    assert {job["parent_seeds"] for job in expanded} == set(SEED_PAIRS)


def test_the_shell_shows_the_sweep(tmp_path):
    proc = tfuse("fuse", "+experiment=vit_digits_tiny", "+ablation=qk", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = yaml.safe_load(proc.stdout)["hydra"]["sweeper"]["params"]
    assert shown["fusion.qk"] == "separate,eq_t_map,joint,head_aware" and shown["parent_seeds"] == "[0,1],[2,3],[4,5]"
