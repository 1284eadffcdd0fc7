"""What the command line names, loaded: local files (failing at once when missing), Hub names, the embedded task,
reward functions by short name or dotted path; and bad rows named by file and line."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from datasets import Dataset

STUDENT_MODEL = "student"
"""Model name that stands for the embedded task's local student ([`trl_uniapl.demo.student.build_student`], cached)."""
EMBEDDED_DATASET = "embedded"
"""Dataset name that stands for the embedded IFEval-style task of [`trl_uniapl.ifeval.task.make_splits`] (no Hub)."""

REWARD_FUNCS = {
    "ifeval_dense": "trl_uniapl.ifeval.rewards.ifeval_dense_reward",
    "ifeval_strict": "trl_uniapl.ifeval.rewards.ifeval_strict_reward",
    "ifeval_loose": "trl_uniapl.ifeval.rewards.ifeval_loose_reward",
}
"""Short names accepted by `--reward_funcs` (the `_reward` suffix is optional); any dotted path works too."""

IFEVAL_COLUMNS = ("instruction_id_list", "kwargs")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# A name ending like this is meant as a local file: Hub ids never do, so it must not be looked up on the Hub.
FILE_SUFFIXES = (*LOCAL_FORMATS, ".txt", ".tsv", ".yaml", ".yml", ".gz", ".zip", ".bin", ".safetensors", ".pt")


class UserError(ValueError):
    """An expected mistake in the command's input: `trl-uniapl` prints the message alone and exits with status 1."""


# Errors a user causes with the input they give; the command prints their message alone (traceback with --verbose).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` asks for no Hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only mean a local file or folder, never a Hub id (`org/name` or `name`).

    True for names starting with `.`, `/` or `~`, with a file extension (`prefs.jsonl`), with more than one `/`, or
    whose first component is an existing local folder (`data/demos`, `uniapl-demo/modle`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()


def file_not_found(name: str, what: str, hint: str = "") -> FileNotFoundError:
    """The error for a local `name` that does not exist; it names the directory relative paths are resolved in."""
    message = f"file not found: {name} ({what}; relative paths are read from the current directory {os.getcwd()})."
    return FileNotFoundError(f"{message} {hint}".rstrip())


def _cached_on_hub(model_name_or_path: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(model_name_or_path, name), str)
        for name in ("config.json", "adapter_config.json")
    )


def check_model_path(model_name_or_path: str | None, hint: str = "", hub_timeout: float = 10.0) -> str:
    """Return a loadable model location for `model_name_or_path` (`student` builds or loads the embedded task's
    student), or raise at once with a clear message.

    A name that looks like a local path (see [`looks_like_local_path`]) and does not exist raises `FileNotFoundError`
    ("file not found: ...") without any network access. A Hub id that is not in the Hugging Face cache raises a
    [`UserError`] when `HF_HUB_OFFLINE` is set, or when one metadata request to the Hub (no retries, `hub_timeout`
    seconds) fails, instead of the minutes of retries `from_pretrained` would spend. `hint` is appended to the
    messages (e.g. how to use a local model instead)."""
    if not model_name_or_path:
        raise UserError("No model given: pass `--model_name_or_path <local directory or Hub id>`.")
    if model_name_or_path == STUDENT_MODEL:
        from ..demo.student import build_student

        return build_student()
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(
                f"Model path {model_name_or_path!r} exists but holds no `config.json`: pass a directory written by "
                "`save_pretrained`."
            )
        return str(path)
    if looks_like_local_path(model_name_or_path):
        raise file_not_found(model_name_or_path, "model folder", hint)
    if _cached_on_hub(model_name_or_path):
        return model_name_or_path
    where = (
        f"Model {model_name_or_path!r} is not a local folder (looked in {os.getcwd()}) nor in the Hugging Face cache"
    )
    if hub_offline():
        raise UserError(f"{where}, and HF_HUB_OFFLINE is set. {hint}".rstrip())
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(model_name_or_path, timeout=hub_timeout)
    except RepositoryNotFoundError:
        reason = "the Hub has no such model (or it needs a login)"
    except HfHubHTTPError:  # the Hub answered (rate limit, server error): leave the decision to from_pretrained
        return model_name_or_path
    except Exception as error:  # no network: connection errors differ between requests and httpx
        reason = f"the Hub cannot be reached ({type(error).__name__}: {error})"
    else:
        return model_name_or_path
    raise UserError(f"{where}, and {reason}. {hint}".rstrip())


def _embedded_split(split: str, role: str, seed: int) -> Dataset:
    from ..ifeval.task import make_splits

    splits = make_splits(seed=seed)
    default = {"preference": "preference", "demonstrations": "demonstrations", "eval": "eval"}[role]
    if split in splits:
        return splits[split]
    if split in ("train", "test", "validation"):
        return splits[default]
    raise ValueError(f"The embedded task has splits {list(splits)}, not {split!r}.")


def load_any_dataset(
    name: str, split: str = "train", config: str | None = None, role: str = "preference", seed: int = 0
) -> Dataset:
    """Load one split of a local file, a `save_to_disk` directory, a directory of data files, a Hub dataset, or the
    embedded task (`name="embedded"`; `role` picks its split when `split` is a generic name like `train`).

    A local file or a dataset with a single split is returned whatever `split` says."""
    from datasets import load_dataset, load_from_disk

    if name == EMBEDDED_DATASET:
        return _embedded_split(split, role, seed)
    path = Path(name).expanduser()
    if path.is_file():
        builder = LOCAL_FORMATS.get("".join(path.suffixes[-1:]).lower())
        if builder is None:
            raise UserError(f"Unsupported data file {name!r}: use one of {sorted(LOCAL_FORMATS)}.")
        loaded = load_dataset(builder, data_files=str(path))
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
    elif path.is_dir():
        loaded = load_dataset(str(path), name=config)
    elif looks_like_local_path(name):
        raise file_not_found(name, f"{role} dataset")
    else:
        try:
            loaded = load_dataset(name, name=config)
        except ConnectionError as error:  # offline (HF_HUB_OFFLINE fails at once) or the Hub is unreachable
            raise UserError(
                f"Dataset {name!r} is not a local file or folder (looked in {os.getcwd()}) and could not be loaded "
                f"from the Hugging Face Hub: {error}"
            ) from error
    if isinstance(loaded, Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"Dataset {name!r} has splits {list(loaded)}, not {split!r}. Pick one with the split argument.")


def check_columns(dataset: Dataset, required: Sequence[str], description: str, hint: str = "") -> None:
    """Raise a `ValueError` naming the dataset and the missing columns if `dataset` lacks any of `required`."""
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {description} lacks the column(s) {missing}; it has {dataset.column_names}. {hint}".rstrip()
        )


def resolve_reward_func(name: str) -> Callable:
    """A reward function from a short name (`ifeval_dense`, `ifeval_strict`, `ifeval_loose`, with or without the
    `_reward` suffix) or a dotted import path (`package.module.function`, the current directory is importable)."""
    short = name.removesuffix("_reward")
    target = REWARD_FUNCS.get(short, name)
    if "." not in target:
        raise ValueError(
            f"Unknown reward function {name!r}. Use one of {sorted(REWARD_FUNCS)} or a dotted import path such as "
            "`my_package.rewards.my_reward`."
        )
    module_name, attribute = target.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"Unknown reward function {name!r}: cannot import module {module_name!r} ({error}). Use one of "
            f"{sorted(REWARD_FUNCS)} or a dotted import path."
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"Unknown reward function {name!r}: module {module_name!r} has no callable {attribute!r}.")
    return function


def _uses_ifeval(reward_names: Sequence[str]) -> bool:
    return any(
        REWARD_FUNCS.get(n.removesuffix("_reward"), n).startswith("trl_uniapl.ifeval.rewards.") for n in reward_names
    )


def _row_label(source: str, index: int) -> str:
    if source == EMBEDDED_DATASET:
        return f"row {index + 1} of the embedded task"
    suffix = Path(source).suffix.lower()
    if suffix == ".jsonl":
        return f"{source}, line {index + 1}"
    if suffix == ".csv":
        return f"{source}, line {index + 2} (after the header)"
    return f"{source}, row {index + 1}"


def name_rows(message: str, sources: dict[str, str]) -> str:
    """Rewrite the trainer's row references (`train_dataset row 3`: the 0-based index in a Python argument) as the
    file and 1-based line the user wrote (`prefs.jsonl, line 4`); `sources` maps the argument to the file name."""

    def label(match: re.Match) -> str:
        argument, index = match.group(1), int(match.group(2))
        return _row_label(sources[argument], index) if argument in sources else match.group(0)

    renamed = re.sub(r"\b(train_dataset|demonstration_dataset) row (\d+)", label, message)
    argument = next((name for name in sources if message.startswith(f"{name} row ")), None)
    if argument is not None:  # "... but row 0 is standard": the same dataset's other row
        renamed = re.sub(
            r"\bbut row (\d+)\b", lambda m: "but " + _row_label(sources[argument], int(m.group(1))), renamed
        )
    return renamed
