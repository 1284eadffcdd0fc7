"""The `trl-uniapl` command (also `python -m trl_uniapl`): `train`, `demo` and `evaluate`.

Every subcommand is parsed by TRL's [`~trl.TrlParser`], so flags and YAML configs (`--config file.yaml`) work as in
`trl grpo`:

    trl-uniapl demo                                   # the embedded task, end to end, on CPU, in minutes
    trl-uniapl train --model_name_or_path Qwen/Qwen3-0.6B --dataset_name prefs.jsonl \
        --demonstration_dataset_name demos.jsonl --reward_funcs ifeval_dense --output_dir out
    accelerate launch --config_file <trl>/accelerate_configs/multi_gpu.yaml -m trl_uniapl train --config run.yaml
    trl-uniapl evaluate --model_name_or_path out --output_json metrics.json
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

STUDENT_MODEL = "student"
"""Model name that stands for the embedded task's local student ([`trl_uniapl.student.build_student`], cached)."""
EMBEDDED_DATASET = "embedded"
"""Dataset name that stands for the embedded IFEval-style task of [`trl_uniapl.task.make_splits`] (no Hub)."""

REWARD_FUNCS = {
    "ifeval_dense": "trl_uniapl.rewards.ifeval_dense_reward",
    "ifeval_strict": "trl_uniapl.rewards.ifeval_strict_reward",
    "ifeval_loose": "trl_uniapl.rewards.ifeval_loose_reward",
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

# Settings of the demo, tuned so that the student's held-out strict accuracy rises clearly on 2 CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 64,
    "num_generations": 2,
    "num_iterations": 4,
    "max_completion_length": 64,
    "demonstration_ratio": 0.75,
    "sft_coef": 1.0,
    "adversarial_coef": 0.1,
    "discriminator_learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
}
DEMO_MAX_STEPS, DEMO_QUICK_MAX_STEPS = 160, 4
DEMO_NUM_EVAL, DEMO_QUICK_NUM_EVAL = 200, 16


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainScriptArguments:
    """Datasets and rewards of `trl-uniapl train`.

    A dataset argument is a local file (`.json`, `.jsonl`, `.parquet`, `.csv`, `.arrow`), a directory written by
    `save_to_disk` (or holding data files), a Hub dataset name, or `embedded` for the task shipped with trl-uniapl.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference prompts (prompt-only rows, optionally with the columns the rewards read, e.g. "
            "`instruction_id_list` and `kwargs`): local file, save_to_disk directory, Hub name, or `embedded`."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of `dataset_name` (the `name` of `load_dataset`)."}
    )
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "Split of `dataset_name` to train on (`embedded`: `train` means `preference`)."},
    )
    demonstration_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Expert demonstrations (`prompt` + `completion` rows, standard or conversational): local file, "
            "save_to_disk directory, Hub name, or `embedded`. Without it, rows of `dataset_name` with a `completion` "
            "are the demonstrations."
        },
    )
    demonstration_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of `demonstration_dataset_name`."}
    )
    demonstration_dataset_split: str = field(
        default="train",
        metadata={"help": "Split of `demonstration_dataset_name` (`embedded`: `train` means `demonstrations`)."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation prompts, used when `eval_strategy` is not `no`; defaults to `dataset_name` with "
            "`eval_dataset_split`."
        },
    )
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the eval dataset."})
    eval_dataset_split: str = field(
        default="test", metadata={"help": "Split of the eval dataset (`embedded`: `test` means `eval`)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["ifeval_dense"],
        metadata={
            "help": "Reward functions: `ifeval_dense`, `ifeval_strict`, `ifeval_loose` (IFEval checkers, read the "
            "`instruction_id_list` and `kwargs` columns) or any dotted import path (e.g. `my_pkg.rewards.fn`)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Optional reward model (sequence classifier, one label), added to the reward functions."},
    )
    embedded_seed: int = field(
        default=0, metadata={"help": "Seed of the embedded task's splits when a dataset name is `embedded`."}
    )


@dataclass
class DemoArguments:
    """Options of `trl-uniapl demo`."""

    output_dir: str = field(
        default="uniapl-demo", metadata={"help": "Folder for the report, plots, metrics and trained model."}
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": f"UniAPL optimizer steps (default {DEMO_MAX_STEPS}; {DEMO_QUICK_MAX_STEPS} with --quick)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the task's splits and of training."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "Smoke-test mode: a tiny student built in seconds, a few steps and a small eval set. Shows the "
            "pipeline, not the accuracy gain."
        },
    )
    num_eval: int | None = field(
        default=None,
        metadata={
            "help": f"Held-out prompts to evaluate before and after (default {DEMO_NUM_EVAL}; {DEMO_QUICK_NUM_EVAL} "
            "with --quick)."
        },
    )
    learning_rate: float = field(
        default=DEMO_SETTINGS["learning_rate"], metadata={"help": "Policy learning rate of the demo run."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the student is cached (default $TRL_UNIAPL_CACHE or ~/.cache/trl_uniapl)."},
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})


@dataclass
class EvaluateArguments:
    """Options of `trl-uniapl evaluate`."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to evaluate (local directory, Hub id, or `student`); default: the embedded task's student."
        },
    )
    dataset_name: str = field(
        default=EMBEDDED_DATASET,
        metadata={
            "help": "IFEval-format dataset (`prompt`, `instruction_id_list`, `kwargs`): local file, save_to_disk "
            "directory, Hub name (e.g. google/IFEval), or `embedded` (the embedded task's held-out split)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of `dataset_name`."})
    dataset_split: str = field(
        default="train", metadata={"help": "Split to evaluate (`embedded`: `train` means `eval`)."}
    )
    num_rows: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation budget per response (greedy decoding)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the embedded task's splits."})
    output_json: str | None = field(
        default=None, metadata={"help": "Write the metrics (and per-row responses) to this JSON file."}
    )
    device: str | None = field(default=None, metadata={"help": "Torch device (default: cuda if available, else cpu)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})


# --------------------------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------------------------
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
        from .student import build_student

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
    from .task import make_splits

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
    return any(REWARD_FUNCS.get(n.removesuffix("_reward"), n).startswith("trl_uniapl.rewards.") for n in reward_names)


# --------------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------------
TRAIN_USAGE = "trl-uniapl train [--config run.yaml] [options]   (`trl-uniapl train --help` lists the options)"


def _help_sections(parser, sections: Sequence[tuple[str, str, Sequence[str]]], rest_title: str) -> None:
    """List the options whose destinations are in each section first in `--help`, one titled group per section,
    and every other option after them under `rest_title`.

    Argparse groups options by where they were added; TrlParser adds each dataclass's fields in one block, so
    UniAPL's few options would come after TrainingArguments' hundreds. Only the help layout changes, not parsing."""
    rest = parser._optionals
    groups = []
    for title, description, dests in sections:
        group = parser.add_argument_group(title, description)
        wanted = set(dests)
        moved = [action for action in rest._group_actions if action.dest in wanted]
        rest._group_actions[:] = [action for action in rest._group_actions if action.dest not in wanted]
        group._group_actions.extend(moved)
        groups.append(group)
    rest.title = rest_title
    parser._action_groups[:] = [parser._positionals, *groups, rest]


def make_train_parser(prog: str = "trl-uniapl train"):
    """TrlParser of `trl-uniapl train`: script arguments, [`UniAPLConfig`] and `trl.ModelConfig`; `--help` lists the
    dataset and UniAPL options first, then the model's, GRPO's and the Trainer's."""
    from dataclasses import fields

    from transformers import TrainingArguments
    from trl import GRPOConfig, ModelConfig, TrlParser

    from .config import UniAPLConfig

    parser = TrlParser((TrainScriptArguments, UniAPLConfig, ModelConfig), prog=prog, usage=TRAIN_USAGE)

    def names(dataclass, minus=None) -> list[str]:
        excluded = {f.name for f in fields(minus)} if minus else set()
        return [f.name for f in fields(dataclass) if f.name not in excluded]

    _help_sections(
        parser,
        [
            ("datasets and rewards", None, ["help", "config", *names(TrainScriptArguments)]),
            ("UniAPL (SFT term, discriminator, adversarial reward)", None, names(UniAPLConfig, GRPOConfig)),
            ("model, LoRA and quantization (trl.ModelConfig)", None, names(ModelConfig)),
            ("GRPO (trl.GRPOConfig)", None, names(GRPOConfig, TrainingArguments)),
        ],
        "training loop, logging and saving (transformers.TrainingArguments)",
    )
    return parser


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_resume(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: `true`/`false` (any case, as the error messages and
    YAML spell them) become booleans unless a folder of that name exists; a path stays a path."""
    if not isinstance(value, str) or os.path.isdir(value):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0", "none", ""):
        return None
    return value


def resolve_resume(resume: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from (the newest complete one for `True`), checked file by file; raises a
    clear error for a missing folder or a damaged file."""
    from .checkpoints import check_checkpoint_files

    if resume is None or resume is False:
        return None
    if resume is True:
        from .trainer import last_complete_checkpoint

        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise UserError(
                f"--resume_from_checkpoint true, but {output_dir} holds no complete checkpoint (checkpoint-N folders "
                "are written every `save_steps`). Train without it to start from scratch."
            )
    else:
        checkpoint = str(resume)
        if not os.path.isdir(checkpoint):
            raise file_not_found(checkpoint, "checkpoint folder", "Pass a checkpoint-N folder, or `true`.")
    check_checkpoint_files(checkpoint)
    return checkpoint


def prepare_training(script_args: TrainScriptArguments, training_args, model_args) -> dict[str, Any]:
    """Check the arguments and load everything `UniAPLTrainer` needs; returns its keyword arguments."""
    from trl import get_peft_config, get_quantization_config

    model = check_model_path(model_args.model_name_or_path)
    reward_funcs: list[Any] = [resolve_reward_func(name) for name in script_args.reward_funcs or []]
    if script_args.reward_model_name_or_path:
        reward_funcs.append(check_model_path(script_args.reward_model_name_or_path))
    if not reward_funcs:
        raise ValueError("No reward: pass `--reward_funcs` (e.g. `ifeval_dense`) or `--reward_model_name_or_path`.")
    if script_args.dataset_name is None and script_args.demonstration_dataset_name is None:
        raise ValueError("No training data: pass `--dataset_name` and/or `--demonstration_dataset_name`.")

    uses_ifeval = _uses_ifeval(script_args.reward_funcs or [])
    # Only the IFEval rewards read these columns: a custom reward's user must not be sent looking for them.
    ifeval_hint = (
        "The IFEval rewards read `instruction_id_list` and `kwargs` (google/IFEval format)." if uses_ifeval else ""
    )
    needs = ["prompt", *IFEVAL_COLUMNS] if uses_ifeval else ["prompt"]
    seed = script_args.embedded_seed
    train_dataset = demonstration_dataset = eval_dataset = None
    if script_args.dataset_name is not None:
        train_dataset = load_any_dataset(
            script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config, "preference", seed
        )
        check_columns(train_dataset, needs, f"preference dataset {script_args.dataset_name!r}", ifeval_hint)
    if script_args.demonstration_dataset_name is not None:
        demonstration_dataset = load_any_dataset(
            script_args.demonstration_dataset_name,
            script_args.demonstration_dataset_split,
            script_args.demonstration_dataset_config,
            "demonstrations",
            seed,
        )
        check_columns(
            demonstration_dataset,
            [*needs, "completion"],
            f"demonstration dataset {script_args.demonstration_dataset_name!r}",
            "Demonstrations are `prompt` + `completion` rows; the policy is also sampled and rewarded on their "
            "prompts.",
        )
        if train_dataset is None:  # demonstrations only: they are the whole training set
            train_dataset, demonstration_dataset = demonstration_dataset, None
    if training_args.eval_strategy != "no":
        eval_name = script_args.eval_dataset_name or script_args.dataset_name
        if eval_name is None:
            raise ValueError("`eval_strategy` is set but there is no eval dataset: pass `--eval_dataset_name`.")
        eval_dataset = load_any_dataset(
            eval_name, script_args.eval_dataset_split, script_args.eval_dataset_config, "eval", seed
        )
        check_columns(eval_dataset, needs, f"eval dataset {eval_name!r}", ifeval_hint)

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    return {
        "model": model,
        "reward_funcs": reward_funcs,
        "args": training_args,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "demonstration_dataset": demonstration_dataset,
        "quantization_config": get_quantization_config(model_args),
        "peft_config": get_peft_config(model_args),
    }


DEVICE_AND_PRECISION_OPTIONS = ("use_cpu", "bf16", "fp16")


def _sets_device_or_precision(argv: Sequence[str]) -> bool:
    """Whether the command line or its `--config` YAML chooses the device or the precision itself."""
    for token in argv:
        name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
        if token.startswith("--") and name in DEVICE_AND_PRECISION_OPTIONS:
            return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as file:
            config = yaml.safe_load(file)
        return isinstance(config, dict) and any(name in config for name in DEVICE_AND_PRECISION_OPTIONS)
    return False


def train_main(argv: Sequence[str] | None = None):
    """`trl-uniapl train`: UniAPL training from flags and/or a YAML `--config`; returns the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_train_parser()
    detect_cpu = not cuda_available() and not _sets_device_or_precision(argv)
    if detect_cpu:
        # TRL defaults to bf16, which fails on a CPU-only machine; a YAML config or a flag can still override this.
        parser.set_defaults(use_cpu=True, bf16=False)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if detect_cpu:
        print("trl-uniapl: no CUDA GPU found: training on the CPU in fp32.", file=sys.stderr)
    return run_training(script_args, training_args, model_args)


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


def run_training(script_args: TrainScriptArguments, training_args, model_args):
    """Train with [`UniAPLTrainer`] and save the model to `training_args.output_dir`; returns the trainer."""
    from .trainer import UniAPLTrainer

    resume = parse_resume(training_args.resume_from_checkpoint)
    training_args.resume_from_checkpoint = resume if isinstance(resume, str) else None
    checkpoint = resolve_resume(resume, training_args.output_dir)
    kwargs = prepare_training(script_args, training_args, model_args)
    train_source = script_args.dataset_name or script_args.demonstration_dataset_name
    sources = {"train_dataset": train_source, "demonstration_dataset": script_args.demonstration_dataset_name}
    try:
        trainer = UniAPLTrainer(**kwargs)
    except ValueError as error:
        renamed = name_rows(str(error), {k: v for k, v in sources.items() if v})
        if renamed == str(error):
            raise
        raise UserError(renamed) from error
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


# --------------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------------
SUMMARY_METRICS = (
    ("prompt_level_strict_acc", "prompt-level strict acc"),
    ("inst_level_strict_acc", "instruction-level strict acc"),
    ("prompt_level_loose_acc", "prompt-level loose acc"),
    ("inst_level_loose_acc", "instruction-level loose acc"),
    ("topic_accuracy", "on-topic rate"),
    ("unrequested_effect_rate_mean", "unrequested-effect rate"),
    ("mean_response_tokens", "mean response tokens"),
    ("length_wasserstein_to_expert", "length W1 to expert (tokens)"),
    ("mean_expert_logprob", "expert log-prob / token"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the summary IFEval metrics, one column per entry of `columns` (e.g. before / after)."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in SUMMARY_METRICS:
        if all(columns[name].get(key) is None for name in names):
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(columns[name].get(key)) for name in names) + " |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of [`trl_uniapl.evaluation.evaluate_ifeval`]'s results (no per-row lists)."""
    return {key: value for key, value in results.items() if not isinstance(value, list)}


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`trl-uniapl evaluate`: IFEval metrics of a model on a dataset; prints a table and optionally writes JSON."""
    from trl import TrlParser

    (args,) = TrlParser((EvaluateArguments,), prog="trl-uniapl evaluate").parse_args_and_config(args=argv)
    return run_evaluate(args)


def run_evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """Evaluate `args.model_name_or_path` (default: the student) on `args.dataset_name`; returns the metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_ifeval, expert_logprob

    model_path = check_model_path(args.model_name_or_path or STUDENT_MODEL)
    dataset = load_any_dataset(args.dataset_name, args.dataset_split, args.dataset_config, "eval", args.seed)
    check_columns(dataset, ["prompt", *IFEVAL_COLUMNS], f"dataset {args.dataset_name!r}", "It needs IFEval format.")
    if args.num_rows is not None:
        dataset = dataset.select(range(min(args.num_rows, len(dataset))))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).to(_device(args.device))
    results = evaluate_ifeval(
        model,
        tokenizer,
        dataset,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    if "expert_completion" in dataset.column_names:
        logps = expert_logprob(model, tokenizer, dataset["prompt"], dataset["expert_completion"])
        results["expert_logprobs"] = logps
        results["mean_expert_logprob"] = sum(logps) / len(logps)
    results["model"] = str(model_path)
    results["dataset"] = args.dataset_name
    print(metrics_table({Path(str(model_path)).name or str(model_path): results}))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str))
        print(f"Metrics written to {args.output_json}.")
    return results


# --------------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------------
def demo_config(output_dir: str, max_steps: int, seed: int, quick: bool = False, **overrides: Any):
    """The [`UniAPLConfig`] of the demo (CPU, no reporting, progress bar on)."""
    from .config import UniAPLConfig

    settings = dict(DEMO_SETTINGS)
    if quick:
        settings.update(per_device_train_batch_size=8, max_completion_length=32, num_iterations=1)
    settings.update(
        output_dir=output_dir,
        max_steps=max_steps,
        seed=seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1 if max_steps <= 20 else 5,
        save_strategy="no",
    )
    settings.update(overrides)
    return UniAPLConfig(**settings)


DEMO_OUTPUT_DIR = "uniapl-demo"


def find_demo_output(start: str | os.PathLike | None = None, levels: int = 2) -> Path | None:
    """The output folder of `trl-uniapl demo` (`uniapl-demo/` holding `model/config.json`) in `start` (default: the
    current directory) or one of its `levels` nearest parents, or None.

    Jupyter runs a notebook from its own folder (`examples/notebooks/`) while the demo is usually run from the
    repository root, two levels up; the search stops there so that an unrelated `uniapl-demo/` higher up is not
    picked."""
    folder = Path(start or os.getcwd()).resolve()
    for candidate in [folder, *folder.parents][: levels + 1]:
        output = candidate / DEMO_OUTPUT_DIR
        if (output / "model" / "config.json").exists():
            return output
    return None


def _log_series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> str:
    """Reward, SFT and discriminator curves from a trainer's `state.log_history`, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Task and total reward", "mean reward per completion", ["rewards/ifeval_dense_reward/mean", "reward"]),
        ("SFT loss on expert completions", "NLL per token (nats)", ["sft/loss"]),
        ("Discriminator accuracy", "accuracy", ["discriminator/acc_real", "discriminator/acc_fake"]),
        ("Adversarial reward and JS estimate", "value", ["adversarial/reward_mean", "discriminator/js_estimate"]),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (title, ylabel, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = _log_series(log_history, key)
            if steps:
                axis.plot(steps, values, marker=".", label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def plot_distributions(
    lengths: dict[str, Sequence[float]], logprobs: dict[str, Sequence[float]], path: str | os.PathLike
) -> str:
    """Histograms of response lengths and of mean token log-probabilities, saved at `path`.

    `logprobs` keys that start with `before:`/`after:` followed by the same text (e.g. `before: own responses`) are
    drawn in one panel per text, before against after, so that no panel overlays more than two histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def shared_bins(samples: dict[str, Sequence[float]]) -> np.ndarray:
        values = np.concatenate([np.asarray(v, dtype=float) for v in samples.values() if len(v)] or [np.zeros(1)])
        return np.histogram_bin_edges(values, bins=25)

    panels: dict[str, dict[str, Sequence[float]]] = {}
    for name, values in logprobs.items():
        when, _, what = name.partition(": ")
        panels.setdefault(what or name, {})[when if what else name] = values
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4), squeeze=False)
    axes = axes[0]
    bins = shared_bins(lengths)
    for name, values in lengths.items():
        axes[0].hist(values, bins=bins, alpha=0.5, label=name)
    axes[0].set_title("Response length")
    axes[0].set_xlabel("tokens")
    bins = shared_bins(logprobs)  # one scale for every log-prob panel, so they compare
    for axis, (what, series) in zip(axes[1:], panels.items()):
        for name, values in series.items():
            axis.hist(values, bins=bins, alpha=0.5, label=name)
        axis.set_title(f"Mean token log-prob of {what}")
        axis.set_xlabel("log-prob per token (nats)")
    for axis in axes:
        axis.set_ylabel("number of prompts")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def _analyse(model, tokenizer, dataset: Dataset, show_progress: bool, max_new_tokens: int) -> dict[str, Any]:
    from .evaluation import evaluate_ifeval, expert_logprob

    results = evaluate_ifeval(model, tokenizer, dataset, max_new_tokens=max_new_tokens, show_progress=show_progress)
    prompts = dataset["prompt"]
    results["expert_logprobs"] = expert_logprob(model, tokenizer, prompts, dataset["expert_completion"])
    results["mean_expert_logprob"] = sum(results["expert_logprobs"]) / len(results["expert_logprobs"])
    results["own_logprobs"] = expert_logprob(model, tokenizer, prompts, results["responses"])
    return results


def demo_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`trl-uniapl demo`: the embedded task end to end (student, evaluation, UniAPL, evaluation, plots, report)."""
    from trl import TrlParser

    (args,) = TrlParser((DemoArguments,), prog="trl-uniapl demo").parse_args_and_config(args=argv)
    return run_demo(args)


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the demo described by `args`; returns `{"before": ..., "after": ..., "wall_time_s": ...}` summaries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from .rewards import ifeval_dense_reward
    from .student import build_student
    from .task import make_splits
    from .trainer import UniAPLTrainer

    start = time.time()
    show = not args.no_progress
    transformers_logging.set_verbosity_error()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    max_steps = args.max_steps or (DEMO_QUICK_MAX_STEPS if args.quick else DEMO_MAX_STEPS)
    num_eval = args.num_eval or (DEMO_QUICK_NUM_EVAL if args.quick else DEMO_NUM_EVAL)
    max_new_tokens = 32 if args.quick else 96

    print(f"[1/5] Student model ({'fast, for smoke tests' if args.quick else 'cached after the first build'})")
    student = build_student(cache_dir=args.cache_dir, fast=args.quick, show_progress=show)
    splits = make_splits(seed=args.seed)
    eval_rows = splits["eval"].select(range(min(num_eval, len(splits["eval"]))))
    tokenizer = AutoTokenizer.from_pretrained(student)

    print(f"[2/5] Evaluating the student on {len(eval_rows)} held-out prompts")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(student)
    before = _analyse(model, tokenizer, eval_rows, show, max_new_tokens)
    del model

    print(f"[3/5] UniAPL training: {max_steps} steps on {len(splits['demonstrations'])} demonstrations and "
          f"{len(splits['preference'])} preference prompts (IFEval dense reward + discriminator)")  # fmt: skip
    config = demo_config(
        str(output_dir / "run"),
        max_steps,
        args.seed,
        args.quick,
        learning_rate=args.learning_rate,
        disable_tqdm=not show,
    )
    trainer = UniAPLTrainer(
        model=student,
        reward_funcs=[ifeval_dense_reward],
        args=config,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
        processing_class=tokenizer,
    )
    train_start = time.time()
    trainer.train()
    train_time = time.time() - train_start
    trainer.save_model(str(output_dir / "model"))

    print("[4/5] Evaluating the trained policy")
    after = _analyse(trainer.model, tokenizer, eval_rows, show, max_new_tokens)

    print("[5/5] Plots and report")
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    plot_distributions(
        {
            "student (before)": before["response_lengths"],
            "UniAPL (after)": after["response_lengths"],
            "expert": after["expert_response_lengths"],
        },
        {
            "before: the model's own responses": before["own_logprobs"],
            "after: the model's own responses": after["own_logprobs"],
            "before: the expert's responses": before["expert_logprobs"],
            "after: the expert's responses": after["expert_logprobs"],
        },
        output_dir / "distributions.png",
    )
    wall_time = time.time() - start
    table = metrics_table({"before": before, "after": after})
    outcome = {
        "before": summary(before),
        "after": summary(after),
        "wall_time_s": wall_time,
        "train_time_s": train_time,
        "max_steps": max_steps,
        "num_eval": len(eval_rows),
        "quick": args.quick,
        "settings": {key: getattr(config, key) for key in DEMO_SETTINGS if hasattr(config, key)},
    }
    (output_dir / "metrics.json").write_text(json.dumps(outcome, indent=2, default=str))
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2, default=str))
    examples = "\n\n".join(
        f"**Prompt:** {row['prompt'][0]['content']}\n\n- before: {b!r}\n- after: {a!r}"
        for row, b, a in list(zip(eval_rows, before["responses"], after["responses"]))[:3]
    )
    report = f"""# UniAPL demo

Student `{student}` trained with `UniAPLTrainer` for {max_steps} steps (SFT on expert demonstrations + GRPO with the
IFEval dense reward + adversarial reward from an online discriminator), evaluated on {len(eval_rows)} held-out prompts
(20% on unseen topics, 20% with unseen instruction combinations). Wall time {wall_time:.0f} s (training
{train_time:.0f} s).

{table}

![training curves](training_curves.png)

![distributions](distributions.png)

## Examples

{examples}
"""
    (output_dir / "report.md").write_text(report)
    print()
    print(table)
    print(f"\nWall time {wall_time:.0f} s. Report, plots and metrics in {output_dir}/ (model in {output_dir}/model).")
    return outcome


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
COMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], Any], str]] = {
    "train": (train_main, "Train with UniAPL (UniAPLConfig + ModelConfig + dataset and reward arguments)."),
    "demo": (demo_main, "Run the embedded instruction-following task end to end on CPU, with plots and a report."),
    "evaluate": (evaluate_main, "IFEval metrics of a model on a dataset (default: the embedded held-out split)."),
}


def usage() -> str:
    lines = [
        "usage: trl-uniapl {train,demo,evaluate} [options] [--verbose]  (each takes --help and --config file.yaml)"
    ]
    lines += [""] + [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "  --verbose  show the full traceback of an error and every library warning"]
    return "\n".join(lines)


# Known harmless messages that every command used to print, matched exactly (logger name, message start) so that any
# other warning still shows.
KNOWN_NOISE_LOGS = (
    # bitsandbytes on a CPU with AVX512-BF16 tries to fetch an optional Hub kernel and falls back to its own.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # Offline the IFEval checkers split sentences with lm-eval's regex splitter; tested, and documented in the README.
    ("trl_uniapl.rewards", "NLTK 'punkt_tab' data is not installed"),
)
KNOWN_NOISE_WARNINGS = (
    # transformers 5 renamed the option TRL's configs still set; nothing for a user to change.
    r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated and will be removed in v6",
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_noise() -> None:
    """Hide the known harmless warnings of [`KNOWN_NOISE_LOGS`] and [`KNOWN_NOISE_WARNINGS`] (only those)."""
    for logger_name, prefix in KNOWN_NOISE_LOGS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    for message in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


_NEGATIVE_EXPONENT = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """Write `--option -1e-3` as `--option=-1e-3`: argparse takes a negative number in exponent notation for an
    option name and fails with "expected one argument" (plain `-0.001` already works)."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_EXPONENT.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one `trl-uniapl` command and return its result (the trainer of `train`, the metrics of `evaluate` and
    `demo`); errors propagate. [`main`] is the console script's wrapper that turns this into an exit status."""
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"trl-uniapl: error: unknown command {command!r}", file=sys.stderr)
        raise SystemExit(2)
    if "--config" in rest:
        index = rest.index("--config")
        config = rest[index + 1] if index + 1 < len(rest) else None
        if config is None or not os.path.isfile(config):
            raise file_not_found(config or "(none given)", "the --config YAML file")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return COMMANDS[command][0](rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trl-uniapl` console script and of `python -m trl_uniapl`; returns the exit status.

    0 on success. An expected input error ([`EXPECTED_ERRORS`]: bad data, a missing file, an unknown reward, ...)
    prints its message alone to stderr and returns 1; `--verbose` adds the traceback and shows the warnings that are
    otherwise hidden. Unexpected errors propagate with their traceback; argparse's errors exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [token for token in argv if token != "--verbose"]
    if not verbose:
        silence_known_noise()
    try:
        run(argv)
    except EXPECTED_ERRORS as error:
        if verbose:
            traceback.print_exc()
        else:
            print(f"trl-uniapl: error: {error}", file=sys.stderr)
            print("(run again with --verbose for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trl-uniapl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
