"""scripts/bench_fuse.py's arguments: --only sections, defaults, the JSON keys; a tiny scale case end to end."""
import importlib.util
import json
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


def test_scale_case_defaults(bench):
    args = bench.parse_args(["--case", "gpt2-124m"])
    assert (args.samples, args.tokens, args.repair, args.repair_samples, args.dtype, args.tiny) == (
        32, 128, "none", 32, "float32", False)
    assert args.only == ["fuse", "memory"] and args.scale_dir == bench.ROOT / "outputs" / "scale" / "gpt2-124m"
    args = bench.parse_args(["--case", "tinyllama-1.1b", "--samples", "64", "--tokens", "512", "--repair", "lstsq",
                             "--dtype", "bfloat16", "--tiny", "--only", "memory"])
    assert (args.samples, args.tokens, args.repair, args.repair_samples, args.only) == (64, 512, "lstsq", 64, ["memory"])
    assert args.scale_dir.name == "tinyllama-1.1b-bfloat16-tiny"
    assert bench.parse_args(["--case", "bert-base", "--repair-samples", "8"]).repair_samples == 8
    assert bench.parse_args(["--case", "vit-b16", "--scale-dir", "x", "--only", "all"]).scale_dir.name == "x"
    assert {"gpt2-124m", "qwen2-0.5b", "tinyllama-1.1b", "llama3-8b", "vit-b16", "bert-base"} <= set(bench.SCALE.CASES)


@pytest.mark.parametrize("argv", [["--case", "gpt2-124m", "--only", "repair"], ["--case", "vit", "--tokens", "64"],
                                  ["--case", "llama", "--dtype", "bfloat16"]])
def test_scale_options_belong_to_the_scale_cases_alone(bench, argv, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(argv)
    assert exit.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_scale_keys(bench):
    keys = ["case", "device", "samples", "tokens", "repair", "repair_samples", "dtype", "parameters", "fuse_s", "stages",
            "ratio", "ratio_best", "forward_s", "memory_fuse_s", "memory_stages", "peak_rss_mb", "peak_rss_x_parent",
            "recovery_error"]
    assert bench.scale_keys("cpu") == keys
    assert bench.scale_keys("cuda") == [*keys[:-1], "peak_gpu_mb", "recovery_error"]


def test_a_tiny_scale_case_end_to_end(bench, tmp_path, monkeypatch, capsys):
    """Both sections on a tiny Qwen2 pair with the lstsq repair (about 10 s): the pair built once, then reused."""
    argv = ["--case", "qwen2-0.5b", "--tiny", "--scale-dir", str(tmp_path), "--samples", "8", "--tokens", "32",
            "--repair", "lstsq", "--repeats", "1"]
    monkeypatch.setattr("sys.argv", ["bench_fuse.py", *argv])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out) == bench.scale_keys("cpu") and None not in out.values()
    assert set(out["stages"]) == set(out["memory_stages"]) == {"statistics", "transport", "repair"}
    assert out["recovery_error"] < 1e-3 and out["peak_rss_x_parent"] > 1
    monkeypatch.setattr("sys.argv", ["bench_fuse.py", *argv, "--only", "fuse"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pair: reusing {tmp_path}" and json.loads(lines[-1])["peak_rss_mb"] is None
