"""Quality benchmark: SFT, GRPO, SFT-then-GRPO, UniAPL and two ablations on the embedded instruction-following task.

Every method starts from the same cached student (`trl_uniapl.demo.student.build_student`), sees the same
demonstrations, preference prompts and 400-prompt held-out split
(`trl_uniapl.ifeval.task.make_splits(seed=--data_seed)`), and trains for the same number of optimizer steps with the
same optimizer, learning rate and schedule family (linear decay):

- `sft`: TRL `SFTTrainer` on the demonstrations, `demonstrations_per_step` demonstrations per step: exactly the number
  of demonstrations each UniAPL step puts into its SFT term (so "demonstrations seen" is equal too). It samples
  nothing, which is why its wall-clock is much lower.
- `grpo`: TRL `GRPOTrainer` with `ifeval_dense_reward` on all prompts (preference prompts and the demonstrations'
  prompts, without their completions); same generation batch (prompts x generations) as UniAPL.
- `sft_then_grpo`: `sft` for `round(sft_fraction * steps)` steps, then `grpo` from that checkpoint for the rest.
- `uniapl`: `UniAPLTrainer` with SFT term and discriminator (`UniAPLConfig` defaults, except the learning rates).
- `uniapl_no_disc`: `adversarial_coef=0` (joint SFT + GRPO, no discriminator).
- `uniapl_no_sft`: `sft_coef=0` (GRPO + discriminator reward).

Held-out metrics come from `trl_uniapl.ifeval.evaluation.evaluate_ifeval` (greedy) and `expert_logprob`; the table
also shows the untrained student and a constant, prompt-independent reply. Outputs (in `--output_dir`): `quality.json`
(every run's numbers and settings), `quality.md` (tables) and PNG plots.

    python benchmarks/quality.py --jobs 3        # full run: 3 seeds, one process each, merged
    python benchmarks/quality.py                 # the same, seeds in turn in one process
    python benchmarks/quality.py --quick         # a few minutes, pipeline check only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers in benchmarks/
from common import apply_overrides, machine, quiet_libraries  # noqa: E402

from trl_uniapl.demo import student as student_lib  # noqa: E402
from trl_uniapl.ifeval import task  # noqa: E402
from trl_uniapl.ifeval.evaluation import _ifeval_metrics, evaluate_ifeval, expert_logprob  # noqa: E402
from trl_uniapl.ifeval.rewards import check_response, ifeval_dense_reward, prompt_text  # noqa: E402

METHODS = ("sft", "grpo", "sft_then_grpo", "uniapl", "uniapl_no_disc", "uniapl_no_sft")
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
# The same prompt-independent reply as tests/test_task.py: quoted, titled, lowercase, no commas, a P.S., an end phrase.
CONSTANT_REPLY = (
    '"<<a short note>>\nhere is a short note that i wrote for you today and i hope you like it\n'
    'p.s. thank you for reading\nany other questions?"'
)

FULL = {
    "steps": 200,
    "per_device_train_batch_size": 32,
    "num_generations": 2,
    "max_completion_length": 48,
    "learning_rate": 3e-3,
    "discriminator_learning_rate": 1e-3,
    "adversarial_coef": 0.1,
    "discriminator_type": "shared",
    "sft_coef": 1.0,
    "sft_fraction": 0.5,
    "num_eval": 400,
    "eval_max_new_tokens": 64,
    "curve_every": 50,
    "curve_prompts": 100,
    "num_demonstrations": 256,
    "num_preference": 512,
}
QUICK = {
    **FULL,
    "steps": 4,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 24,
    "num_eval": 40,
    "eval_max_new_tokens": 32,
    "curve_every": 2,
    "curve_prompts": 16,
    "num_demonstrations": 32,
    "num_preference": 32,
}


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
class HeldOutCurve(TrainerCallback):
    """Prompt-level strict accuracy on a fixed subset of the held-out split every `every` optimizer steps."""

    def __init__(self, tokenizer, dataset, every: int, max_new_tokens: int, total_steps: int, step_offset: int = 0):
        self.tokenizer, self.dataset, self.every, self.total_steps = tokenizer, dataset, every, total_steps
        self.max_new_tokens, self.step_offset = max_new_tokens, step_offset
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step + self.step_offset  # offset: the GRPO stage of sft_then_grpo
        if self.every > 0 and step % self.every == 0 and step < self.total_steps:
            start = time.perf_counter()
            results = evaluate_ifeval(
                model, self.tokenizer, self.dataset, max_new_tokens=self.max_new_tokens,
                batch_size=len(self.dataset), show_progress=False,
            )  # fmt: skip
            self.points.append((step, results["prompt_level_strict_acc"]))
            self.seconds += time.perf_counter() - start


def _quiet(trainer):
    """Drop the PrinterCallback that `disable_tqdm=True` installs (it prints every log dict)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _common_args(settings: dict[str, Any], output_dir: str, seed: int, steps: int) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_steps=steps,
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )


def _grpo_args(settings: dict[str, Any]) -> dict[str, Any]:
    return dict(
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        num_generations=settings["num_generations"],
        max_completion_length=settings["max_completion_length"],
        temperature=1.0,
        beta=0.0,
    )


def demonstrations_per_step(settings: dict[str, Any]) -> int:
    """Demonstrations in each UniAPL step's SFT term: half the prompts of a generation batch (the default ratio)."""
    prompts = settings["per_device_train_batch_size"] // settings["num_generations"]
    return min(max(round(0.5 * prompts), 1), prompts - 1)


def train_sft(model_path, tokenizer, demonstrations, settings, output_dir, seed, steps, callbacks):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(settings, output_dir, seed, steps),
        per_device_train_batch_size=demonstrations_per_step(settings),
        max_length=1024,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model_path,
        args=args,
        train_dataset=demonstrations.select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


def train_grpo(model_path, tokenizer, prompts, settings, output_dir, seed, steps, callbacks):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**_common_args(settings, output_dir, seed, steps), **_grpo_args(settings))
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=[ifeval_dense_reward],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


def train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, callbacks, **overrides):
    from trl_uniapl import UniAPLConfig, UniAPLTrainer

    config = dict(
        sft_coef=settings["sft_coef"],
        adversarial_coef=settings["adversarial_coef"],
        discriminator_learning_rate=settings["discriminator_learning_rate"],
        discriminator_type=settings["discriminator_type"],
    )
    config.update(overrides)
    args = UniAPLConfig(**_common_args(settings, output_dir, seed, steps), **_grpo_args(settings), **config)
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=[ifeval_dense_reward],
        args=args,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


def _history(trainer, step_offset: int = 0) -> list[dict[str, float]]:
    keep = ("loss", "reward", "rewards/ifeval_dense_reward/mean", "frac_reward_zero_std", "sft/loss", "expert/logp",
            "discriminator/acc_real", "discriminator/acc_fake", "discriminator/js_estimate", "adversarial/reward_mean",
            "completions/mean_length", "step_time")  # fmt: skip
    rows = []
    for entry in trainer.state.log_history:
        if "step" in entry and "loss" in entry:
            row = {key: float(entry[key]) for key in keep if key in entry}
            row["step"] = entry["step"] + step_offset
            rows.append(row)
    return rows


def run_method(method, model_path, tokenizer, splits, curve_set, settings, seed, work_dir):
    """Train one method for `settings["steps"]` optimizer steps; return the trained model, logs and timings."""
    steps = settings["steps"]
    output_dir = os.path.join(work_dir, f"{method}-seed{seed}")
    curve = HeldOutCurve(tokenizer, curve_set, settings["curve_every"], settings["eval_max_new_tokens"], steps)
    grpo_prompts = concatenate_datasets(
        [
            splits["preference"],
            splits["demonstrations"].remove_columns("completion").cast(splits["preference"].features),
        ]
    )
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    if method == "sft":
        trainer = train_sft(
            model_path, tokenizer, splits["demonstrations"], settings, output_dir, seed, steps, [curve]
        )
        history = _history(trainer)
    elif method == "grpo":
        trainer = train_grpo(model_path, tokenizer, grpo_prompts, settings, output_dir, seed, steps, [curve])
        history = _history(trainer)
    elif method == "sft_then_grpo":
        sft_steps = max(1, round(settings["sft_fraction"] * steps))
        first = train_sft(model_path, tokenizer, splits["demonstrations"], settings, output_dir + "-sft", seed,
                          sft_steps, [curve])  # fmt: skip
        history = _history(first)
        stage_dir = output_dir + "-sft-model"
        first.save_model(stage_dir)
        tokenizer.save_pretrained(stage_dir)
        del first
        curve.step_offset = sft_steps
        trainer = train_grpo(
            stage_dir, tokenizer, grpo_prompts, settings, output_dir, seed, steps - sft_steps, [curve]
        )
        history += _history(trainer, step_offset=sft_steps)
    elif method == "uniapl":
        trainer = train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, [curve])
        history = _history(trainer)
    elif method == "uniapl_no_disc":
        trainer = train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, [curve],
                               adversarial_coef=0.0)  # fmt: skip
        history = _history(trainer)
    elif method == "uniapl_no_sft":
        trainer = train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, [curve],
                               sft_coef=0.0)  # fmt: skip
        history = _history(trainer)
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    train_seconds = time.perf_counter() - start - curve.seconds
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model, history, curve.points, train_seconds, curve.seconds


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, eval_set, settings) -> dict[str, Any]:
    start = time.perf_counter()
    results = evaluate_ifeval(
        model, tokenizer, eval_set, max_new_tokens=settings["eval_max_new_tokens"], batch_size=200, show_progress=False
    )
    prompts = eval_set["prompt"]
    expert = expert_logprob(model, tokenizer, prompts, eval_set["expert_completion"], batch_size=100)
    own = expert_logprob(model, tokenizer, prompts, results["responses"], batch_size=100)
    summary = {key: results[key] for key in METRICS}
    summary.update(
        topic_accuracy=results["topic_accuracy"],
        ifeval_only_prompt_level_strict_acc=results["ifeval_only"]["prompt_level_strict_acc"],
        unrequested_effect_rate_mean=results["unrequested_effect_rate_mean"],
        unrequested_effect_rate=results["unrequested_effect_rate"],
        mean_response_tokens=results["mean_response_tokens"],
        length_wasserstein_to_expert=results["length_wasserstein_to_expert"],
        expert_logp=float(np.mean(expert)),
        policy_logp=float(np.mean(own)),
        prompt_level_strict_acc_by_group=results.get("prompt_level_strict_acc_by_group"),
        eval_seconds=time.perf_counter() - start,
    )
    distributions = {
        "response_lengths": results["response_lengths"],
        "expert_lengths": results["expert_response_lengths"],
        "expert_logp": expert,
        "policy_logp": own,
        "sample_responses": results["responses"][:5],
        "prompt_level_strict": results["prompt_level_strict"],
    }
    return summary, distributions


def score_constant_reply(eval_set, reply: str = CONSTANT_REPLY) -> dict[str, Any]:
    """IFEval metrics of one prompt-independent reply given to every held-out prompt (same checks as the policies)."""
    strict, loose = [], []
    for index, row in enumerate(eval_set):
        arguments = dict(
            instruction_id_list=row["instruction_id_list"],
            kwargs=row["kwargs"],
            topic_keywords=row["topic_keywords"],
            prompt=prompt_text(row["prompt"]),
            row_index=index,
        )
        strict.append(check_response(reply, **arguments).results)
        loose.append(check_response(reply, loose=True, **arguments).results)
    metrics = _ifeval_metrics(strict, loose)
    metrics["reply"] = reply
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------
SUMMARY_KEYS = (*METRICS, "topic_accuracy", "unrequested_effect_rate_mean", "expert_logp", "policy_logp",
                "mean_response_tokens", "length_wasserstein_to_expert", "train_seconds")  # fmt: skip


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        method_runs = [run for run in runs if run["method"] == method]
        table[method] = {}
        for key in SUMMARY_KEYS:
            values = [run["metrics"][key] if key in run["metrics"] else run[key] for run in method_runs]
            values = [v for v in values if v is not None]
            table[method][key] = {
                "mean": float(np.mean(values)) if values else math.nan,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return table


PERCENT_KEYS = ("topic_accuracy", "unrequested_effect_rate_mean")


def _fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    table, settings = report["summary"], report["settings"]
    lines = [
        f"Held-out split: {settings['num_eval']} prompts; {settings['steps']} optimizer steps per method; seeds "
        f"{report['seeds']}; mean ± std over seeds (sample std). Accuracies in %.",
        "",
        "| method | seeds | prompt strict | inst strict | prompt loose | inst loose | topic | unrequested effects | "
        "expert log-prob | length W1 to expert | mean tokens | train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, stats in table.items():
        lines.append(
            f"| {method} | {stats['prompt_level_strict_acc']['n']} | {_fmt(stats['prompt_level_strict_acc'], 100)}"
            f" | {_fmt(stats['inst_level_strict_acc'], 100)}"
            f" | {_fmt(stats['prompt_level_loose_acc'], 100)} | {_fmt(stats['inst_level_loose_acc'], 100)}"
            f" | {_fmt(stats['topic_accuracy'], 100)} | {_fmt(stats['unrequested_effect_rate_mean'], 100)}"
            f" | {_fmt(stats['expert_logp'], 1, 3)} | {_fmt(stats['length_wasserstein_to_expert'], 1, 2)}"
            f" | {_fmt(stats['mean_response_tokens'], 1, 1)} | {_fmt(stats['train_seconds'], 1, 0)} |"
        )
    for name, key in (("student (untrained)", "initial"), ("constant reply", "constant_reply")):
        ref = report[key]
        lines.append(
            f"| *{name}* | – | {ref['prompt_level_strict_acc'] * 100:.1f} | "
            f"{ref['inst_level_strict_acc'] * 100:.1f} | "
            f"{ref['prompt_level_loose_acc'] * 100:.1f} | {ref['inst_level_loose_acc'] * 100:.1f} | "
            + " | ".join(
                (f"{ref[k] * 100:.1f}" if k in PERCENT_KEYS else f"{ref[k]:.3g}")
                if isinstance(ref.get(k), float)
                else "–"
                for k in (
                    "topic_accuracy",
                    "unrequested_effect_rate_mean",
                    "expert_logp",
                    "length_wasserstein_to_expert",
                    "mean_response_tokens",
                )  # fmt: skip
            )
            + " | – |"
        )
    if report.get("merged_from"):
        walls = ", ".join(f"{part['wall_seconds']:.0f}" for part in report["merged_from"])
        lines += ["", f"Wall-clock: {len(report['merged_from'])} processes run side by side ({walls} s)."]
    else:
        lines += ["", f"Total wall-clock: {report['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], output_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    runs, methods = report["runs"], list(report["summary"])
    colors = {method: f"C{i}" for i, method in enumerate(methods)}

    def save(fig, name: str, dpi: int = 110) -> None:
        fig.tight_layout()
        paths.append(os.path.join(output_dir, name))
        fig.savefig(paths[-1], dpi=dpi)
        plt.close(fig)

    # Accuracy per method with the seed spread.
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, method in enumerate(methods):
        values = [run["metrics"]["prompt_level_strict_acc"] * 100 for run in runs if run["method"] == method]
        ax.bar(i, np.mean(values), color=colors[method], alpha=0.6)
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.axhline(report["initial"]["prompt_level_strict_acc"] * 100, color="gray", ls="--", label="untrained student")
    ax.axhline(report["constant_reply"]["prompt_level_strict_acc"] * 100, color="red", ls=":", label="constant reply")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("held-out prompt-level strict acc (%)")
    ax.legend(fontsize=8)
    save(fig, "quality_accuracy.png")

    # Accuracy against step (held-out subset) and training reward against step.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        for j, run in enumerate(r for r in runs if r["method"] == method):
            points = (
                [(0, report["initial_curve"])] + run["curve"] + [(report["settings"]["steps"], run["curve_final"])]
            )
            axes[0].plot(*zip(*points), color=colors[method], alpha=0.7, label=method if j == 0 else None)
            rewards = [(h["step"], h["rewards/ifeval_dense_reward/mean"]) for h in run["history"]
                       if "rewards/ifeval_dense_reward/mean" in h]  # fmt: skip
            if rewards:
                axes[1].plot(*zip(*rewards), color=colors[method], alpha=0.5, label=method if j == 0 else None)
    axes[0].set_title(f"held-out prompt strict acc ({report['settings']['curve_prompts']}-prompt subset)")
    axes[1].set_title("training reward (ifeval_dense, sampled completions)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    save(fig, "quality_curves.png")

    # Length and log-prob distributions, policy vs expert (first seed of each method).
    first_seed = report["seeds"][0]
    dists = {run["method"]: run["distributions"] for run in runs if run["seed"] == first_seed}
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 6), squeeze=False)
    for i, method in enumerate(methods):
        d = dists[method]
        top, bottom = axes[0][i], axes[1][i]
        bins = np.arange(0, report["settings"]["eval_max_new_tokens"] + 4, 4)
        top.hist(d["expert_lengths"], bins=bins, alpha=0.5, color="k", label="expert")
        top.hist(d["response_lengths"], bins=bins, alpha=0.5, color=colors[method], label="policy")
        top.set_title(f"{method}: length (tokens)", fontsize=9)
        bottom.hist(d["expert_logp"], bins=30, alpha=0.5, color="k", label="expert completions")
        bottom.hist(d["policy_logp"], bins=30, alpha=0.5, color=colors[method], label="policy's own greedy")
        bottom.set_title("mean token log-prob under policy", fontsize=9)
        if i == 0:
            top.legend(fontsize=7)
            bottom.legend(fontsize=7)
    save(fig, "quality_distributions.png", dpi=100)
    return paths


def merge(directories: list[str], output_dir: str) -> dict[str, Any]:
    """Combine reports of the same settings on different seeds: runs are concatenated, the summary recomputed."""
    reports = []
    for directory in directories:
        with open(os.path.join(directory, "quality.json")) as f:
            reports.append(json.load(f))
    first = reports[0]
    for other in reports[1:]:
        if other["settings"] != first["settings"] or other["data_seed"] != first["data_seed"]:
            raise ValueError("Only reports with identical settings and data_seed can be merged.")
    runs = [run for report in reports for run in report["runs"]]
    order = {method: i for i, method in enumerate(METHODS)}
    runs.sort(key=lambda run: (run["seed"], order[run["method"]]))
    report = dict(first)
    report.update(
        runs=runs,
        seeds=sorted({run["seed"] for run in runs}),
        summary=aggregate(runs),
        merged_from=[
            {"command": r["command"], "wall_seconds": r["wall_seconds"], "machine": r["machine"]} for r in reports
        ],  # fmt: skip
        wall_seconds=max(r["wall_seconds"] for r in reports),
        command=" && ".join(r["command"] for r in reports) + " && python benchmarks/quality.py --merge ...",
    )
    os.makedirs(output_dir, exist_ok=True)
    report["plots"] = [os.path.basename(p) for p in plots(report, output_dir)]
    with open(os.path.join(output_dir, "quality.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(output_dir, "quality.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


def _without_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """`argv` without the given options and their values (`{"--seeds": -1}`: every value up to the next option)."""
    kept, skip = [], 0
    for index, item in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if item.split("=", 1)[0] in options:
            count = options[item.split("=", 1)[0]]
            if "=" not in item:
                rest = argv[index + 1 :]
                skip = next((i for i, x in enumerate(rest) if x.startswith("--")), len(rest)) if count < 0 else count
            continue
        kept.append(item)
    return kept


def run_seeds_in_parallel(argv: list[str], seeds: list[int], jobs: int, output_dir: str) -> dict[str, Any]:
    """One subprocess per seed (at most `jobs` at a time, CPU threads shared out), then `merge` into `output_dir`."""
    base = _without_options(argv, {"--seeds": -1, "--jobs": 1, "--output_dir": 1})
    threads = max(1, (os.cpu_count() or 1) // jobs)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    directories = [os.path.join(output_dir, f"seed{seed}") for seed in seeds]
    pending = list(zip(seeds, directories))
    running: list[tuple[int, subprocess.Popen, Any]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            seed, directory = pending.pop(0)
            os.makedirs(directory, exist_ok=True)
            log = open(os.path.join(directory, "log.txt"), "w")
            script = os.path.abspath(__file__)
            command = [sys.executable, script, *base, "--seeds", str(seed), "--output_dir", directory]
            print(f"seed {seed}: {' '.join(command[1:])} (log: {log.name})", flush=True)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            running.append((seed, process, log))
        time.sleep(5)
        for entry in list(running):
            seed, process, log = entry
            if process.poll() is not None:
                running.remove(entry)
                log.close()
                print(f"seed {seed}: finished with exit code {process.returncode}", flush=True)
                if process.returncode != 0:
                    failed.append(seed)
    if failed:
        raise RuntimeError(f"Seeds {failed} failed; see log.txt in their folders under {output_dir}.")
    return merge(directories, output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny settings (a few minutes): checks the pipeline.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2; quick 0).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--output_dir", default="benchmarks/results/quality")
    parser.add_argument("--data_seed", type=int, default=0, help="Seed of the task splits (same for every method).")
    parser.add_argument("--student_fast", action="store_true", help="Use the much smaller test student.")
    parser.add_argument("--student_cache", default=None, help="Cache dir of the student (default $TRL_UNIAPL_CACHE).")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override a setting, e.g. steps=60.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Run the seeds in this many processes side by side (each with its share of the CPU threads), then merge "
        "them into --output_dir. 1: one process, seeds in turn.",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="Merge the quality.json of runs made with the same settings on other seeds (e.g. in parallel processes) "
        "into --output_dir, instead of training.",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output_dir)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}.")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if args.jobs > 1 and len(seeds) > 1:
        return run_seeds_in_parallel(argv if argv is not None else sys.argv[1:], seeds, args.jobs, args.output_dir)

    settings = dict(QUICK if args.quick else FULL)
    apply_overrides(settings, args.set)

    quiet_libraries()
    os.makedirs(args.output_dir, exist_ok=True)
    wall_start = time.perf_counter()

    model_path = student_lib.build_student(cache_dir=args.student_cache, fast=args.student_fast, show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = task.make_splits(seed=args.data_seed, num_demonstrations=settings["num_demonstrations"],
                              num_preference=settings["num_preference"], num_eval=settings["num_eval"])  # fmt: skip
    eval_set = splits["eval"]
    curve_set = eval_set.select(range(min(settings["curve_prompts"], len(eval_set))))

    initial_model = AutoModelForCausalLM.from_pretrained(model_path)
    initial, initial_distributions = evaluate(initial_model, tokenizer, eval_set, settings)
    # The curve subset is the first `curve_prompts` held-out rows: its end points come from the full evaluation.
    initial_curve = float(np.mean(initial_distributions["prompt_level_strict"][: len(curve_set)]))
    del initial_model
    constant = score_constant_reply(eval_set)
    print(f"untrained student: prompt strict {initial['prompt_level_strict_acc']:.3f}; constant reply "
          f"{constant['prompt_level_strict_acc']:.3f}", flush=True)  # fmt: skip

    runs = []

    def build_report(*_):
        report = {
            "benchmark": "quality",
            "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "quick": args.quick,
            "seeds": seeds,
            "data_seed": args.data_seed,
            "student": {"path": model_path, "fast": args.student_fast},
            "settings": settings,
            "demonstrations_per_step": demonstrations_per_step(settings),
            "method_notes": {
                "sft": "TRL SFTTrainer, completion-only NLL, demonstrations_per_step demonstrations per step",
                "grpo": "TRL GRPOTrainer, ifeval_dense_reward, preference + demonstration prompts",
                "sft_then_grpo": "SFTTrainer for sft_fraction*steps, then GRPOTrainer for the rest (each its own "
                "linear decay)",
                "uniapl": "UniAPLTrainer, SFT term + discriminator (gail reward, bce loss), demonstration_ratio 0.5",
                "uniapl_no_disc": "UniAPLTrainer with adversarial_coef=0",
                "uniapl_no_sft": "UniAPLTrainer with sft_coef=0",
            },
            "machine": machine(),
            "initial": initial,
            "initial_curve": initial_curve,
            "constant_reply": constant,
            "runs": runs,
            "summary": aggregate(runs),
        }
        report["wall_seconds"] = time.perf_counter() - wall_start
        report["machine"]["loadavg_end"] = os.getloadavg()
        report["plots"] = [os.path.basename(p) for p in plots(report, args.output_dir)]
        with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
            json.dump(report, f, indent=1, default=float)
        with open(os.path.join(args.output_dir, "quality.md"), "w") as f:
            f.write(markdown(report))
        return report

    work_dir = tempfile.mkdtemp(prefix="uniapl-quality-")
    try:
        for seed in seeds:
            for method in args.methods:
                torch.manual_seed(seed)
                model, history, curve, train_seconds, curve_seconds = run_method(
                    method, model_path, tokenizer, splits, curve_set, settings, seed, work_dir
                )
                metrics, distributions = evaluate(model, tokenizer, eval_set, settings)
                curve_final = float(np.mean(distributions["prompt_level_strict"][: len(curve_set)]))
                runs.append(dict(method=method, seed=seed, metrics=metrics, train_seconds=train_seconds,
                                 curve_seconds=curve_seconds, curve=curve, curve_final=curve_final,
                                 history=history, distributions=distributions))  # fmt: skip
                print(f"[{time.perf_counter() - wall_start:6.0f}s] {method:15s} seed {seed}: prompt strict "
                      f"{metrics['prompt_level_strict_acc']:.3f}  inst strict {metrics['inst_level_strict_acc']:.3f}  "
                      f"expert logp {metrics['expert_logp']:.3f}  W1 {metrics['length_wasserstein_to_expert']:.2f}  "
                      f"train {train_seconds:.0f}s", flush=True)  # fmt: skip
                build_report()  # partial results survive an interrupted run
                del model
                shutil.rmtree(os.path.join(work_dir), ignore_errors=True)
                os.makedirs(work_dir, exist_ok=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    report = build_report()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
