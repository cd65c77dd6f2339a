"""What a result was produced with: library versions, the hardware, and JSON-ready copies of values."""

from __future__ import annotations

import gc
import os
import platform
from typing import Any

import numpy as np
import torch


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers, peft, datasets, accelerate and loradrop."""
    import accelerate
    import datasets
    import peft
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "accelerate": accelerate.__version__,
            "loradrop": __version__}


def hardware() -> dict[str, Any]:
    """The machine: CPU cores, torch threads, and the GPU (name, memory) when one is used."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count(),
                    # pointed at a CUDA MPS daemon (kernels of processes sharing the GPU run side by side): it
                    # changes the wall times of runs that share a GPU, so the cost tables can tell such runs apart
                    cuda_mps="CUDA_MPS_PIPE_DIRECTORY" in os.environ)
    return info


def autocast_label(dtype: torch.dtype | None, device_type: str) -> str | None:
    """How a run recorded the autocast it scored under, e.g. ``"bfloat16 on cuda"`` (None: none)."""
    return None if dtype is None else f"{str(dtype).removeprefix('torch.')} on {device_type}"


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of `value` (sets become sorted lists, paths and enums strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # enums
        return value.value
    return str(value)


def reset_peak_memory() -> None:
    """Start a new peak-memory window: CUDA's allocator peak and, on Linux, the process's peak RSS."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM (Linux); elsewhere the peak is lifetime
            fh.write("5")
    except OSError:
        pass


def release_memory() -> None:
    """Give the CUDA memory a finished (or failed) run leaves cached back to the device. A sweep's pool workers train
    run after run in one process, and several share a GPU: without this, each keeps its largest run's cache (or, after
    an out-of-memory error, the tensors its traceback held), and the runs started next on that GPU run out of memory."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_memory() -> dict[str, float | None]:
    """Peak memory since `reset_peak_memory`, in MiB: ``cuda`` (allocated tensors) and ``rss`` (host process)."""
    rss = None
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cuda": cuda, "rss": rss}
