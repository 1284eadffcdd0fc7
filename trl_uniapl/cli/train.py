"""`trl-uniapl train`: [`UniAPLConfig`] + `ModelConfig` + dataset and reward arguments, parsed by TRL's `TrlParser`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .data import (
    IFEVAL_COLUMNS,
    UserError,
    _uses_ifeval,
    check_columns,
    check_model_path,
    file_not_found,
    load_any_dataset,
    name_rows,
    resolve_reward_func,
)


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

    from ..config import UniAPLConfig

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
    from ..checkpoints import check_checkpoint_files

    if resume is None or resume is False:
        return None
    if resume is True:
        from ..trainer import last_complete_checkpoint

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


def run_training(script_args: TrainScriptArguments, training_args, model_args):
    """Train with [`UniAPLTrainer`] and save the model to `training_args.output_dir`; returns the trainer."""
    from ..trainer import UniAPLTrainer

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
