"""`trl-uniapl evaluate`: IFEval metrics of a model on a dataset (default: the embedded held-out split)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import EMBEDDED_DATASET, IFEVAL_COLUMNS, STUDENT_MODEL, check_columns, check_model_path, load_any_dataset


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
    """The scalar part of [`trl_uniapl.ifeval.evaluation.evaluate_ifeval`]'s results (no per-row lists)."""
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

    from ..ifeval.evaluation import evaluate_ifeval, expert_logprob

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
