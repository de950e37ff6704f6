"""Faults at scale: a full disk while saving leaves no model a rerun would load; a process killed
while holding a parent's lock does not block the next one."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_vit
from tfuse.arch import hf_vit
from tfuse.errors import TfuseError
from tfuse.io import locked
from tfuse.pipeline import save


def test_a_full_disk_before_or_while_saving_is_one_line_and_leaves_nothing(monkeypatch, tmp_path: Path):
    model = tiny_vit()
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(save.shutil, "disk_usage", lambda path: type("U", (), {"free": need - 1})())
    with pytest.raises(TfuseError, match=f"the disk is full: the model needs {need} bytes and {need - 1} are free"):
        save._save_model(hf_vit, model, tmp_path / "fused", "card", [])
    monkeypatch.undo()

    def fills(model, path):
        (Path(path) / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    fam = type("Family", (), {"save": staticmethod(fills)})
    with pytest.raises(TfuseError, match="the disk filled while writing the model"):
        save._save_model(fam, model, tmp_path / "fused", "card", [])
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))


def test_a_killed_holder_of_a_parent_lock_does_not_block_the_next_run(tmp_path: Path):
    entry = tmp_path / "parents" / "hf_vit-x-seed0"
    entry.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tfuse.io import locked\n"
        f"with locked(Path({str(entry)!r})):\n    print('held', flush=True); time.sleep(60)"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)  # a joblib worker killed mid-training
        holder.wait(timeout=10)
        start = time.monotonic()
        with locked(entry):  # the kernel released the dead process's flock
            assert time.monotonic() - start < 5
    finally:
        holder.kill()
