"""Checks of a checkpoint's files before resuming from it, so that a damaged file is named together with a way out.

Loading a damaged `model.safetensors` otherwise fails deep inside `Trainer` with e.g. `SafetensorError: header too
large`, which names neither the file nor the checkpoint to use instead.
"""

from __future__ import annotations

import os
import zipfile

COMPLETE_MARKER = "uniapl_checkpoint_complete.json"
"""File written last into every UniAPL checkpoint (the same name as `trl_uniapl.trainer.COMPLETE_MARKER`)."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read; the message names the file and the checkpoint to resume from instead."""


def _checkpoint_step(path: str) -> int | None:
    name = os.path.basename(os.path.normpath(path))
    prefix, _, step = name.rpartition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def damaged_file(checkpoint_dir: str) -> tuple[str, str] | None:
    """The first file of `checkpoint_dir` (subfolders included) that cannot be opened, with the reason, or None.

    `.safetensors` files must have a readable header; PyTorch files (`.pt`, `.pth`, `.bin`) must be zip archives (the
    format `torch.save` writes). Only headers and archive directories are read, not the tensors, so this is fast even
    for large checkpoints."""
    from safetensors import safe_open

    for root, folders, files in os.walk(checkpoint_dir):
        folders.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".safetensors"):
                try:
                    with safe_open(path, framework="pt") as handle:
                        handle.keys()
                except Exception as error:  # safetensors raises its own SafetensorError, or OSError
                    return path, f"{type(error).__name__}: {error}"
            elif name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
                return path, "not a PyTorch archive"
    return None


def previous_complete_checkpoint(checkpoint_dir: str, complete_marker: str = COMPLETE_MARKER) -> str | None:
    """The newest complete `checkpoint-N` beside `checkpoint_dir` with a smaller step, or None."""
    step = _checkpoint_step(checkpoint_dir)
    parent = os.path.dirname(os.path.normpath(checkpoint_dir)) or "."
    if step is None or not os.path.isdir(parent):
        return None
    earlier = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        other = _checkpoint_step(path)
        if other is not None and other < step and os.path.exists(os.path.join(path, complete_marker)):
            earlier.append((other, path))
    return max(earlier)[1] if earlier else None


def check_checkpoint_files(checkpoint_dir: str, complete_marker: str = COMPLETE_MARKER) -> None:
    """Raise a [`CheckpointError`] naming the damaged file of `checkpoint_dir` and the previous complete checkpoint
    to resume from instead; do nothing when every file can be opened."""
    damaged = damaged_file(checkpoint_dir)
    if damaged is None:
        return
    path, reason = damaged
    previous = previous_complete_checkpoint(checkpoint_dir, complete_marker)
    if previous is not None:
        fix = (
            f"Resume from the previous complete checkpoint instead: `--resume_from_checkpoint {previous}` "
            f"(Python: `trainer.train(resume_from_checkpoint={previous!r})`), or delete {checkpoint_dir} and resume "
            "with `true`."
        )
    else:
        fix = "There is no earlier complete checkpoint beside it: train from the start (no resume_from_checkpoint)."
    raise CheckpointError(f"Cannot resume: the checkpoint file {path} is damaged ({reason}). {fix}")


__all__ = ["CheckpointError", "check_checkpoint_files", "damaged_file", "previous_complete_checkpoint"]
