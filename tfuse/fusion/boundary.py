"""Hidden states at the current block boundary, per model and calibration batch, within a memory
budget (``fusion.memory_gb``): on the device while it lasts, then in host memory (CUDA runs),
then in a temporary folder on disk, one safetensors file per entry written atomically."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tfuse.errors import TfuseError

GB = 2**30


def default_budget(device: torch.device) -> int:
    """Half the free memory of the device (CUDA) or of the machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return host_available() // 2


def host_available() -> int:
    """The machine's available memory in bytes (``MemAvailable``; 8 GiB where it is not known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GB


class BoundaryCache:
    """Tensors by key, each replaced as the walk moves on: in ``device`` memory while ``budget``
    bytes last, then on the host (when the device is not the CPU) while ``host_budget`` lasts,
    then on disk under ``folder`` (default: the system's temporary directory)."""

    def __init__(self, device: torch.device, budget: int, host_budget: int | None = None, folder: str | None = None):
        self.device = torch.device(device)
        self.left = {"device": budget, "host": 0 if self.device.type == "cpu" else (host_budget or host_available() // 2)}
        self.entries: dict = {}  # key -> (tier, tensor or path, bytes)
        self.parent = folder
        self.folder: tempfile.TemporaryDirectory | None = None
        self.count = 0

    def where(self, key) -> str:
        """``device``, ``host`` or ``disk``."""
        return self.entries[key][0]

    def put(self, key, x: torch.Tensor) -> None:
        self.drop(key)
        size = x.numel() * x.element_size()
        for tier in ("device", "host"):
            if size <= self.left[tier]:
                self.left[tier] -= size
                self.entries[key] = (tier, x.detach() if tier == "device" else x.detach().to("cpu"), size)
                return
        self.entries[key] = ("disk", self._write(x), size)

    def get(self, key) -> torch.Tensor:
        tier, value, _ = self.entries[key]
        if tier == "disk":
            return load_file(value)["x"].to(self.device)
        return value.to(self.device)

    def drop(self, key) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        tier, value, size = entry
        if tier == "disk":
            os.unlink(value)
        else:
            self.left[tier] += size

    def _write(self, x: torch.Tensor) -> str:
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="tfuse-stream-", dir=self.parent)
        self.count += 1
        path = os.path.join(self.folder.name, f"{self.count}.safetensors")
        need = x.numel() * x.element_size()
        free = shutil.disk_usage(self.folder.name).free
        if need > free:
            raise TfuseError(f"{self.folder.name}: the disk is full: {need} bytes are needed for a block boundary's "
                             f"hidden states and {free} are free; raise fusion.memory_gb or free space there")
        tmp = path + ".tmp"
        try:
            save_file({"x": x.detach().to("cpu").contiguous()}, tmp)
            os.replace(tmp, path)  # a killed run leaves a .tmp, never a file a reader would trust
        except OSError as err:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if err.errno == errno.ENOSPC:
                raise TfuseError(f"{path}: the disk is full: {need} bytes are needed for a block boundary's hidden "
                                 "states; raise fusion.memory_gb or free space there") from err
            raise
        return path

    def close(self) -> None:
        for key in list(self.entries):
            self.drop(key)
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None
