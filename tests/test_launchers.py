"""Sweeps through Hydra's launcher plugins: joblib (parallel local processes, shared parents
trained once under a lock) and submitit (SLURM settings; its local executor runs the jobs)."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tfuse.cli import _first_override, job_threads
from conftest import tfuse


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launchers")


def results_of(sweep: Path, jobs: int) -> list[dict]:
    return [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(jobs)]


@pytest.mark.parametrize(("launcher", "cores", "threads"), [
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}, 2, 1),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 4}, 16, 4),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}, 16, 1),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -2}, 16, 1),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 32}, 16, 1),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "cpus_per_task": 8}, 64, 8),
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 16, None),
])
def test_parallel_jobs_share_the_cores(launcher: dict, cores: int, threads: int | None) -> None:
    assert job_threads(OmegaConf.create(launcher), cores) == threads


@pytest.mark.parametrize(("args", "index"), [
    (["-m", "a=1", "--cfg", "hydra"], 1),
    (["--cfg", "job"], 2),
    (["a=1", "--cfg", "job"], 0),
    (["--info", "defaults", "a=1"], 2),
    (["--info", "a=1"], 1),
    (["-m", "--cfg=hydra", "a=1"], 2),
])
def test_the_default_experiment_joins_the_overrides(args: list[str], index: int) -> None:
    assert _first_override(args) == index


def test_slurm_settings_resolve(workdir: Path) -> None:
    proc = tfuse("fuse", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=64",
                 "--cfg", "hydra", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = OmegaConf.create(proc.stdout).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == ("gpu", 1, 8, 64)
    assert launcher.timeout_min == 240 and launcher.array_parallelism == 64


def test_joblib_runs_jobs_in_parallel_and_trains_a_shared_parent_once(workdir: Path) -> None:
    sweep, cache = workdir / "joblib", workdir / "parents"
    proc = tfuse("fuse", "-m", "+experiment=vit_digits_tiny", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "fusion.solver=emd,sinkhorn", "finetune.steps=0", f"cache_dir={cache}", f"hydra.sweep.dir={sweep}",
                 cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = results_of(sweep, 2)
    assert [r["settings"]["solver"] for r in runs] == ["emd", "sinkhorn"]
    for i in range(2):  # each parent trained by one job; the other waited and took it from the cache
        assert sorted(r["parents"][i]["trained_seconds"] > 0 for r in runs) == [False, True]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert runs[0]["one_shot"]["ot"]["accuracy"] > 0.5


def test_submitit_local_executor_runs_the_sweep(workdir: Path) -> None:
    sweep = workdir / "submitit"
    proc = tfuse("fuse", "-m", "+experiment=vit_digits_tiny", "hydra/launcher=slurm_local", "fusion.solver=sinkhorn",
                 "fusion.reg=0.05,0.1", "finetune.steps=0", f"cache_dir={workdir / 'parents'}",
                 f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = results_of(sweep, 2)
    assert [r["settings"]["reg"] for r in runs] == [0.05, 0.1]
    for i in range(2):  # from the cache, or trained by one job while the other waited
        assert sum(r["parents"][i]["trained_seconds"] > 0 for r in runs) <= 1
    assert (sweep / ".submitit").is_dir()
