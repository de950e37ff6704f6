"""scripts/bench_fuse.py's arguments: --only sections, defaults, the JSON keys (no benchmark is run)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_fuse.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fuse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults(bench):
    args = bench.parse_args([])
    assert (args.case, args.samples, args.large, args.repair, args.device) == ("vit", 200, 2000, "lstsq", "cpu")
    assert args.only == ["fuse", "repair", "memory"] and args.repeats == bench.DEFAULT_REPEATS
    assert bench.parse_args(["--case", "vitb"]).samples == 1000


def test_only_sections_in_the_script_order(bench):
    assert bench.parse_args(["--only", "sweep,fuse"]).only == ["fuse", "sweep"]
    assert bench.parse_args(["--only", "memory", "--repeats", "1"]).only == ["memory"]
    assert bench.sections_of("sweep,repair_memory, fuse,memory,repair") == list(bench.SECTIONS)
    assert list(bench.SECTIONS) == ["fuse", "repair", "memory", "repair_memory", "sweep"]
    assert bench.parse_args(["--only", "all"]).only == list(bench.SECTIONS)


@pytest.mark.parametrize("argv", [["--only", "fuse,bogus"], ["--only", ""], ["--repeats", "0"]])
def test_bad_selection_exits_2_with_one_line(bench, argv, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_keys_are_the_same_for_every_selection(bench):
    keys = bench.summary_keys("vit", "cpu", 200, 2000)
    assert keys == ["case", "device", "fuse_s", "ratio", "ratio_best", "repair_fuse_s", "repair_s", "repair_ratio",
                    "repair_ratio_best", "forward_s", "peak_rss_mb_200", "peak_rss_mb_2000", "peak_rss_mb_repair_200",
                    "peak_rss_mb_repair_2000", "sweep8_uncached_s", "sweep8_cached_s", "sweep8_cached_per_fuse"]
    cuda = bench.summary_keys("llama", "cuda", 200, 2000)
    assert {"peak_gpu_mb", "peak_gpu_mb_200", "peak_gpu_mb_repair_2000", "transport_s"} <= set(cuda)
