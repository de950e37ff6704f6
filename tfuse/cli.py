"""The `tfuse` command: `fuse` and `train` are Hydra apps over configs/, `report` tables a sweep."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tfuse.config_keys import check_overrides, describe_preset, override_key, preset
from tfuse.errors import TfuseError
from tfuse.families import OWNERS, checkpoint_json, family_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_EXPERIMENT = "vit_mnist"
USAGE = """usage: tfuse COMMAND [hydra overrides]

commands:
  fuse     fuse parents (default experiment: vit_mnist); e.g. tfuse fuse +experiment=vit_cifar
  train    train one parent from scratch;            e.g. tfuse train +experiment=vit_mnist seed=3
  report   gather a multirun's results into tables;  e.g. tfuse report outputs/multirun/DATE/TIME
  paper    the paper's claims (and the non-IID ones) from scripts/paper_tables.sh's sweeps; e.g. tfuse paper outputs/paper
  check-family  the self-test of a model family's flow graph;  e.g. tfuse check-family model=hf_llama [parents=[DIR,...]]

`tfuse fuse --cfg job` prints the resolved config; `-m` sweeps (Hydra multirun).
"""


def command_overrides(command: str, overrides: list[str]) -> list[str]:
    """The overrides ``tfuse fuse|train`` runs with: without ``+experiment``, the preset of the
    family named by ``model=`` or read from the parents' config.json; a preset's data partition
    set aside for checkpoints; unknown keys refused in one line, before anything runs."""
    default, found = None, None
    if not any(a.lstrip("+").startswith("experiment=") for a in overrides):
        given = _overrides(overrides)
        chosen = next((o.split("=", 1)[1] for o in given if override_key(o) in ("model", "model.family")), None)
        found = checkpoint_family(given) if command == "fuse" and chosen is None else None
        family = chosen or found
        default = OWNERS[family].experiment if family in OWNERS else DEFAULT_EXPERIMENT  # data that fits the family
        at = _first_override(overrides)
        extra = [f"model={found}"] if found and found != _preset_model(default) else []
        overrides = [*overrides[:at], f"+experiment={default}", *extra, *overrides[at:]]
    given = _overrides(overrides)
    if command == "fuse" and any(override_key(o) == "parents" and not o.endswith("=null") for o in given):
        overrides = _for_checkpoints(overrides, given)
        given = _overrides(overrides)
    if not any(a in CHECK_SKIPS or a.split("=", 1)[0] in CHECK_SKIPS for a in overrides):
        check_overrides(given, fusion=command == "fuse")  # an unknown key: one line, before anything runs
    if default and command == "fuse" and any(override_key(o) == "parents" and not o.endswith("=null") for o in given):
        settings = describe_preset("experiment", default, {override_key(o) for o in given})
        family = f" ({found}, read from their config.json)" if found else ""
        Console(stderr=True, soft_wrap=True).print(
            f"tfuse fuse: parents=[...]{family} without +experiment: fusing with {default}'s settings ({settings}); "
            "pass +experiment=NAME to choose", markup=False, highlight=False)
    return overrides


def _hydra_app(command: str, overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    overrides = command_overrides(command, overrides)

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from tfuse.pipeline import run_fuse, run_train  # (torch: not for --cfg, --help)

        run = {"fuse": run_fuse, "train": run_train}[command]
        console = wide_console()
        threads = job_threads(HydraConfig.get().launcher, os.cpu_count() or 1)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        try:
            run(cfg, Path(HydraConfig.get().runtime.output_dir), console)
        except TfuseError as err:
            fail(command, err)

    sys.argv = [f"tfuse {command}", *overrides]
    app()


def checkpoint_family(overrides: list[str]) -> str | None:
    """The family every ``parents=[...]`` checkpoint's config.json names (one line when they name
    none that tfuse knows, or several); None without parents or a readable config."""
    given = [o for o in overrides if override_key(o) == "parents" and not o.endswith("=null")]
    if not given:
        return None
    sources = override_value(given[-1])
    if not isinstance(sources, list):
        return None
    families = {}
    for i, source in enumerate(sources):
        found = checkpoint_json(str(source).partition("@")[0], "config.json")
        if found is not None:
            families[family_of(found[1], f"parents[{i}] '{source}'")] = i
    if len(families) > 1:
        raise TfuseError(f"parents=[...] are checkpoints of different families ({', '.join(families)}); fuse parents "
                         "of one family")
    return next(iter(families), None)


def _for_checkpoints(overrides: list[str], given: list[str]) -> list[str]:
    """Checkpoints are trained already: an experiment's partition of the training data, and the
    weights by shard size it implies, do not apply to them unless the command line sets them (a
    line says what was dropped)."""
    name = next(o.split("=", 1)[1] for o in given if override_key(o) == "experiment")
    body, groups = preset("experiment", name)
    keys = {override_key(o) for o in given}
    dropped = []
    if groups.get("partition", "iid") != "iid" and "partition" not in keys and not any(k.startswith("partition.") for k in keys):
        dropped.append("partition=iid")
    if (body.get("fusion") or {}).get("alpha") == "shard" and "fusion.alpha" not in keys:
        dropped.append("fusion.alpha=null")
    if not dropped:
        return overrides
    Console(stderr=True, soft_wrap=True).print(
        f"tfuse fuse: parents=[...] are trained already: {name}'s data partition does not apply to them ({' '.join(dropped)})",
        markup=False, highlight=False)
    at = _first_override(overrides)
    return [*overrides[:at], *given, *dropped, *overrides[at + len(given):]]


def _preset_model(experiment: str) -> str | None:
    """The model family an experiment preset selects."""
    _, groups = preset("experiment", experiment)
    return groups.get("model")


def wide_console() -> Console:
    """The terminal's width on a terminal; printed to a file or pipe, wide enough that the results
    table keeps one-line headers (rich would fold them into 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def job_threads(launcher, cores: int) -> int | None:
    """Torch threads per job so that a launcher's parallel jobs fit the machine: the cores shared
    among joblib's ``n_jobs`` (negative: joblib's count from the end), a submitit job's
    ``cpus_per_task``; None (torch's default) for the sequential launcher."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or 1)
        n_jobs = cores + 1 + n_jobs if n_jobs < 0 else n_jobs
        return max(1, cores // max(1, min(n_jobs, cores)))
    if "submitit_launcher" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


# Hydra's options that take a value (``--info`` only sometimes: one of its choices)
VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--experimental-rerun"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


# options under which the overrides are not checked first: help, or another config than configs/config.yaml
CHECK_SKIPS = {"-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def _overrides(args: list[str]) -> list[str]:
    """The overrides among Hydra's arguments (together, from the first one on)."""
    at = _first_override(args)
    end = next((i for i in range(at, len(args)) if args[i].startswith("-")), len(args))
    return args[at:end]


def _first_override(args: list[str]) -> int:
    """Where the overrides start among Hydra's arguments (they must stay together: argparse refuses
    overrides on both sides of an option), or the end when there are none."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return i
        takes = arg in VALUE_OPTIONS or (arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_CHOICES)
        i += 2 if takes and "=" not in arg else 1
    return len(args)


def _report(args: list[str]) -> None:
    from tfuse.report import run_report

    parser = argparse.ArgumentParser(prog="tfuse report", description="Tables (and a plot) from a sweep's results.")
    parser.add_argument("dir", help="a multirun directory (or any directory holding results.json files)")
    parser.add_argument("--metric", default=None, help="metric to plot (default: accuracy, else the first)")
    parser.add_argument("--select", choices=("val",), default=None,
                        help="also pick the setting with the best mean validation score and show its test score "
                             "beside the test-best setting's (select.md)")
    ns = parser.parse_args(args)
    run_report(ns.dir, metric=ns.metric, console=wide_console(), select=ns.select)


def _paper(args: list[str]) -> None:
    from tfuse.paper import write_paper_report

    parser = argparse.ArgumentParser(prog="tfuse paper", description="The paper's claims over seed pairs.")
    parser.add_argument("dir", help="the directory scripts/paper_tables.sh wrote (default outputs/paper)")
    ns = parser.parse_args(args)
    write_paper_report(Path(ns.dir), wide_console())


def _check_family(args: list[str]) -> None:
    """``tfuse check-family [model=FAMILY] [parents=[DIR,...]]``: the self-test on each parent, or
    on the family's tiny random model; exit 1 when a check fails."""
    from rich.table import Table

    from tfuse.arch import family, load_parent
    from tfuse.selftest import self_test

    unknown = [a for a in args if override_key(a) not in ("model", "parents")]
    if unknown:
        raise TfuseError(f"check-family: unknown argument {unknown[0]!r}; give model=FAMILY and/or parents=[DIR,...]")
    name = next((a.split("=", 1)[1] for a in args if override_key(a) == "model"), None) or checkpoint_family(args)
    if name is None:
        raise TfuseError(f"check-family: give model=FAMILY ({', '.join(OWNERS)}) or parents=[DIR,...]")
    fam = family(name)
    given = [a for a in args if override_key(a) == "parents"]
    sources = override_value(given[-1]) if given else []
    models = [(s, load_parent(str(s), name, f"parents[{i}]")) for i, s in enumerate(sources)] or [(f"{name}.tiny()", fam.tiny())]
    console, failed = wide_console(), False
    for label, model in models:
        table = Table(title=f"check-family {name}: {label}", title_justify="left")
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for check in self_test(model, fam.graph):
            failed |= not check.passed
            table.add_row(check.name, "ok" if check.passed else "FAILED", check.detail)
        console.print(table)
    if failed:
        sys.exit(1)


def override_value(override: str):
    """The value of a Hydra override (``parents=[a,b]`` -> ``['a', 'b']``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0].value()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 1)
    command, rest = argv[0], argv[1:]
    try:
        if command in ("fuse", "train"):
            _hydra_app(command, rest)
        elif command == "report":
            _report(rest)
        elif command == "paper":
            _paper(rest)
        elif command == "check-family":
            _check_family(rest)
        else:
            raise TfuseError(f"unknown command {command!r}; allowed: fuse, train, report, paper, check-family")
    except TfuseError as err:
        fail(command, err)


def fail(command: str, err: TfuseError) -> None:
    """One clear line on stderr (no traceback) and exit status 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]tfuse {command}: error:[/] {escape(str(err))}", highlight=False)
    sys.exit(2)


if __name__ == "__main__":
    main()
