"""What the two benchmark scripts share: the machine description, `--set KEY=VALUE` overrides, quiet libraries."""

import logging
import os
import platform
import subprocess
import warnings
from typing import Any

import datasets
import torch
from transformers.utils import logging as transformers_logging


def machine() -> dict[str, Any]:
    """Best-effort description of the machine a benchmark ran on (CPU, load, library versions, GPU)."""
    import transformers
    import trl

    info = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:12]
        info["loadavg"] = os.getloadavg()
    except (OSError, subprocess.SubprocessError):  # lscpu or getloadavg missing: the rest still describes the run
        pass
    return info


def apply_overrides(settings: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Apply `KEY=VALUE` overrides, each cast to the type of the setting it replaces."""
    for item in items:
        key, value = item.split("=", 1)
        if key not in settings:
            raise ValueError(f"Unknown setting {key!r}; known: {sorted(settings)}.")
        settings[key] = type(settings[key])(value)
    return settings


def quiet_libraries() -> None:
    """Benchmarks print their own progress; silence the libraries' per-step logs and bars."""
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("trl_uniapl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
