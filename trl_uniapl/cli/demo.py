"""`trl-uniapl demo`: the embedded instruction-following task end to end on CPU, with plots and a report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .evaluate import metrics_table, summary
from .plots import plot_distributions, plot_training_curves

DEMO_SETTINGS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 64,
    "num_generations": 2,
    "num_iterations": 4,
    "max_completion_length": 64,
    "demonstration_ratio": 0.75,
    "sft_warmup_steps": 0,  # the demo shows the one-stage method; UniAPLConfig's default (0.5) is SFT -> A-GRPO
    "sft_coef": 1.0,
    "adversarial_coef": 0.1,
    "discriminator_learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
}
# `--method`: the configurations of the README's "Which configuration is which method", on the demo's settings.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "uniapl": {},
    "chord": {"adversarial_coef": 0.0},
    "sft_then_agrpo": {"sft_coef": 0.0},  # + sft_warmup_steps = half the steps
    "fixed_ref": {},  # + reference_scorer: the embedded task's learned scorer (n-gram F1 with --quick)
    "luffy": {"expert_in_group": True, "sft_coef": 0.0, "adversarial_coef": 0.0},
}
DEMO_MAX_STEPS, DEMO_QUICK_MAX_STEPS = 160, 4
DEMO_NUM_EVAL, DEMO_QUICK_NUM_EVAL = 200, 16


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
    method: str = field(
        default="uniapl",
        metadata={
            "help": "Which configuration to train: 'uniapl' (online discriminator), 'chord' (no discriminator), "
            "'sft_then_agrpo' (SFT-only first half, then GRPO + discriminator), 'fixed_ref' (the paper's fixed "
            "reference-conditioned scorer) or 'luffy' (the expert inside the group).",
            "choices": list(DEMO_METHODS),
        },
    )
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


def demo_config(output_dir: str, max_steps: int, seed: int, quick: bool = False, **overrides: Any):
    """The [`UniAPLConfig`] of the demo (CPU, no reporting, progress bar on)."""
    from ..config import UniAPLConfig

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


# What the demo shows of each log: the task reward, the SFT loss and the discriminator's accuracies.
PROGRESS_KEYS = {
    "reward": "reward",
    "sft/loss": "sft",
    "discriminator/acc_real": "D real",
    "discriminator/acc_fake": "D fake",
}


class DemoProgress(TrainerCallback):
    """A few numbers per log instead of transformers' whole log dict per log (its ProgressCallback and
    PrinterCallback print ~50 keys each time): in the progress bar's postfix, or, without progress bars, one short line
    at every tenth of the run. Every logged value still goes to `log_history.json`."""

    def __init__(self, show_progress: bool):
        self.show_progress = show_progress
        self.bar = None

    @staticmethod
    def _summary(logs: dict[str, Any]) -> dict[str, str]:
        return {label: f"{logs[key]:.3g}" for key, label in PROGRESS_KEYS.items() if isinstance(logs.get(key), float)}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_progress and state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="UniAPL", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        summary = self._summary(logs)
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
        elif state.global_step % max(1, state.max_steps // 10) == 0 or state.global_step == state.max_steps:
            numbers = ", ".join(f"{label} {value}" for label, value in summary.items())
            print(f"  step {state.global_step}/{state.max_steps}: {numbers}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _analyse(model, tokenizer, dataset: Dataset, show_progress: bool, max_new_tokens: int) -> dict[str, Any]:
    from ..ifeval.evaluation import evaluate_ifeval, expert_logprob

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

    from ..demo.student import build_student
    from ..ifeval.rewards import ifeval_dense_reward
    from ..ifeval.task import make_splits
    from ..trainer import UniAPLTrainer

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

    num_demonstrations, num_preference = len(splits["demonstrations"]), len(splits["preference"])
    print(
        f"[3/5] UniAPL training: {max_steps} steps on {num_demonstrations} demonstrations and {num_preference} "
        "preference prompts (IFEval dense reward + discriminator)"
    )
    if args.method not in DEMO_METHODS:
        raise ValueError(f"Unknown --method {args.method!r}: choose one of {list(DEMO_METHODS)}.")
    method = dict(DEMO_METHODS[args.method])
    if args.method == "sft_then_agrpo":
        method["sft_warmup_steps"] = max_steps // 2
    if args.method == "fixed_ref":
        from ..demo.reference_scorer import build_reference_scorer

        method["reference_scorer"] = (
            "ngram_f1" if args.quick else str(build_reference_scorer(cache_dir=args.cache_dir, progress=show))
        )
    config = demo_config(
        str(output_dir / "run"),
        max_steps,
        args.seed,
        args.quick,
        learning_rate=args.learning_rate,
        disable_tqdm=not show,
        **method,
    )
    trainer = UniAPLTrainer(
        model=student,
        reward_funcs=[ifeval_dense_reward],
        args=config,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(DemoProgress(show))
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
        "method": args.method,
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
