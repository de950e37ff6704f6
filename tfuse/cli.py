"""The `tfuse` command: `fuse` and `train` are Hydra apps over configs/, `report` tables a sweep."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tfuse.errors import TfuseError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_EXPERIMENT = "vit_mnist"
USAGE = """usage: tfuse COMMAND [hydra overrides]

commands:
  fuse     fuse parents (default experiment: vit_mnist); e.g. tfuse fuse +experiment=vit_cifar
  train    train one parent from scratch;            e.g. tfuse train +experiment=vit_mnist seed=3
  report   gather a multirun's results into tables;  e.g. tfuse report outputs/multirun/DATE/TIME
  paper    the paper's six claims from scripts/paper_tables.sh's sweeps; e.g. tfuse paper outputs/paper

`tfuse fuse --cfg job` prints the resolved config; `-m` sweeps (Hydra multirun).
"""


def _hydra_app(command: str, overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from tfuse.pipeline import run_fuse, run_train

    run = {"fuse": run_fuse, "train": run_train}[command]
    if not any(a.lstrip("+").startswith("experiment=") for a in overrides):
        default = "bert_mlm" if "model=hf_bert" in overrides else DEFAULT_EXPERIMENT  # text data for BERTs
        overrides = [f"+experiment={default}", *overrides]

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        console = Console()
        try:
            run(cfg, Path(HydraConfig.get().runtime.output_dir), console)
        except TfuseError as err:
            fail(command, err)

    sys.argv = [f"tfuse {command}", *overrides]
    app()


def _report(args: list[str]) -> None:
    from tfuse.report import run_report

    parser = argparse.ArgumentParser(prog="tfuse report", description="Tables (and a plot) from a sweep's results.")
    parser.add_argument("dir", help="a multirun directory (or any directory holding results.json files)")
    parser.add_argument("--metric", default=None, help="metric to plot (default: accuracy, else the first)")
    parser.add_argument("--select", choices=("val",), default=None,
                        help="also pick the setting with the best mean validation score and show its test score "
                             "beside the test-best setting's (select.md)")
    ns = parser.parse_args(args)
    run_report(ns.dir, metric=ns.metric, select=ns.select)


def _paper(args: list[str]) -> None:
    from tfuse.paper import write_paper_report

    parser = argparse.ArgumentParser(prog="tfuse paper", description="The paper's claims over seed pairs.")
    parser.add_argument("dir", help="the directory scripts/paper_tables.sh wrote (default outputs/paper)")
    ns = parser.parse_args(args)
    write_paper_report(Path(ns.dir), Console())


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
        else:
            raise TfuseError(f"unknown command {command!r}; allowed: fuse, train, report, paper")
    except TfuseError as err:
        fail(command, err)


def fail(command: str, err: TfuseError) -> None:
    """One clear line on stderr (no traceback) and exit status 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]tfuse {command}: error:[/] {escape(str(err))}", highlight=False)
    sys.exit(2)


if __name__ == "__main__":
    main()
