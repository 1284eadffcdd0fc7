"""The demo's on-disk cache: a model directory built once, recorded with its settings, published atomically.

[`build_student`](student.py) and [`build_reference_scorer`](reference_scorer.py) both build into a staging directory
next to the final one and rename it into place when done, so that an interrupted build leaves nothing that looks
complete and two processes building the same entry at once both end with a complete one. Both build at a fixed
number of CPU threads ([`BUILD_THREADS`]): float reductions split across a different number of threads round
differently, and a student built on 1 thread differs in its last bits from one built on 2, which 200 steps of SFT at
a high learning rate amplify into points of accuracy (docs/benchmarks.md, "The student was rebuilt per machine").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

# The thread count of every cached build, whatever the machine. One thread, because with more the float reductions
# can also depend on the machine's load (MKL may run a product on fewer threads than asked when the cores are busy):
# two 2-thread builds of the student on one 2-core machine, at different times and loads, differed (SHA-256
# fcbc6008... and ed7aebfc...). One thread fixes the thread count, not the CPU's vector kernels: the same build on an
# Intel Xeon and on an AMD EPYC machine differs (de247328... and e0f8787e...), which is why the benchmark records
# the student of every regime's runs.
BUILD_THREADS = 1


def is_complete(path: Path, settings_file: str, needed: Sequence[str], settings: dict[str, Any]) -> bool:
    """Whether `path` holds every file of `needed` and a `settings_file` recording exactly `settings`."""
    record = path / settings_file
    if not record.is_file() or not all((path / name).is_file() for name in needed):
        return False
    try:
        return json.loads(record.read_text()) == settings
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def staged_build(
    path: Path, settings_file: str, needed: Sequence[str], settings: dict[str, Any], show_progress: bool
) -> Iterator[Path]:
    """Yield a staging directory to build into; on success write `settings` to it and rename it to `path`.

    A failed build removes the staging directory. If another process published a complete `path` first, its entry is
    kept and ours discarded. Transformers' progress bars are hidden during the build unless `show_progress`. Torch runs
    on `BUILD_THREADS` CPU threads inside the block and on the caller's count again after it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    if not show_progress:
        transformers_logging.disable_progress_bar()
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        yield staging
        (staging / settings_file).write_text(json.dumps(settings, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(staging, path)
        except OSError:  # another process finished the same entry first
            if not is_complete(path, settings_file, needed, settings):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(caller_threads)
        if bars_enabled:
            transformers_logging.enable_progress_bar()
