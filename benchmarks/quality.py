"""Quality benchmark: SFT, GRPO, staged and one-stage mixes, each tuned on validation, then scored on test.

The protocol (`quality_protocol.py`), per regime:

1. every method trains once per point of its tuning grid (`quality_protocol.grids`: GRID_SIZE points for every
   method, over each method's sensible range) and is scored on the VALIDATION split;
2. each method's best grid point is chosen on validation prompt-level strict accuracy (`selection.json`);
3. `--seeds` (default 5) seeds at each selected configuration are trained and scored ONCE on the TEST split;
4. the report gives means with 95% bootstrap confidence intervals over seeds and prompts, and paired differences
   against UniAPL (same seeds, same prompts).

Every method starts from the same cached student (`trl_uniapl.demo.student.build_student`) and trains for the same
number of optimizer steps with AdamW and linear decay. Every step that reads demonstrations reads the same number of
them, `sft_batch_size` (16): TRL's `SFTTrainer` batch, and UniAPL's decoupled SFT batch
(`sft_per_device_train_batch_size`). Equal optimizer steps and equal demonstrations per step are the primary
comparison; each run's JSON records the demonstrations it read, the completions it sampled and its seconds beside it.

- `sft`: TRL `SFTTrainer`, `sft_batch_size` demonstrations per step;
- `grpo`: TRL `GRPOTrainer` on the preference prompts and the demonstrations' prompts;
- `sft_then_grpo`: the usual two-stage pipeline, two TRL trainers: `SFTTrainer` for `sft_fraction` of the steps at
  `sft_learning_rate` (`sft_batch_size` per step), then `GRPOTrainer` from its weights, with a fresh optimizer, at
  `learning_rate` for the rest;
- `sft_then_agrpo`: the paper's staged SFT → A-GRPO in ONE `UniAPLTrainer` run: `sft_warmup_steps` (the same SFT
  steps, constant `sft_warmup_learning_rate`), then `sft_coef=0` with the online discriminator (λ > 0);
- `uniapl`: `UniAPLTrainer`, one stage: SFT term (α) and online discriminator (λ);
- `uniapl_no_disc`: the same with `adversarial_coef=0` (CHORD-like: GRPO + α·SFT);
- `uniapl_fixed_ref`: the same with the paper's FIXED reference-conditioned scorer instead of the online
  discriminator (`reference_scorer`: the embedded task's learned scorer, `build_reference_scorer()`);
- `luffy`: `expert_in_group=True` (the expert's completion in each demonstration prompt's GRPO group), no SFT term,
  no discriminator.

Sampling methods draw `num_generations` = 8 completions per prompt, with the same generation batch. Runs are written
one file each as they finish; rerunning the same command skips them, so a killed session loses at most the run in
progress, and a regime whose runs are all on disk only rebuilds its report. Without `--methods` a base regime runs the
methods tuned over a grid of their own there (`quality_protocol.REGIME_METHODS`); the other variants run at UniAPL's
selection in the variant regimes. Every regime records the SHA-256 of its student (`student.sha256`) and refuses runs
made on another; a variant regime copies the base regime's runs of its reference configurations only when both ran on
the same student.

    python benchmarks/quality.py --regime default                  # 256 demonstrations, 512 prompts, dense reward
    python benchmarks/quality.py --regime scarce                   # 128 demonstrations, 1,024 prompts
    python benchmarks/quality.py --regime sparse                   # all-or-nothing IFEval reward
    python benchmarks/quality.py --regime lambda_sweep --base default   # λ values and the Lagrangian mode
    python benchmarks/quality.py --regime discriminators --base default # online, frozen, reference-conditioned
    python benchmarks/quality.py --regime switch_points --base default  # where the staged methods switch to RL
    python benchmarks/quality.py --regime edges --base default --phase grid  # one step beyond the grids' ends
    python benchmarks/quality.py --regime default --report         # quality.json/.md from what is finished
    python benchmarks/quality.py --regime default --jobs 2         # the runs in 2 processes side by side
    python benchmarks/quality.py --quick                           # a few minutes, pipeline check only
"""

from __future__ import annotations

import argparse
import hashlib
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers in benchmarks/
import quality_protocol as protocol  # noqa: E402
from common import apply_overrides, machine, quiet_libraries  # noqa: E402
from quality_stats import distinct_ngrams, per_prompt_records  # noqa: E402

from trl_uniapl.ifeval.evaluation import _ifeval_metrics  # noqa: E402
from trl_uniapl.ifeval.rewards import check_response, ifeval_dense_reward, ifeval_strict_reward, prompt_text  # noqa: E402

METHODS = protocol.METHODS
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
REWARDS = {"dense": ifeval_dense_reward, "strict": ifeval_strict_reward}
# The same prompt-independent reply as tests/test_task.py: quoted, titled, lowercase, no commas, a P.S., an end phrase.
CONSTANT_REPLY = (
    '"<<a short note>>\nhere is a short note that i wrote for you today and i hope you like it\n'
    'p.s. thank you for reading\nany other questions?"'
)

FULL = {
    # Budget: optimizer steps per run (every method), chosen by the learning-curve probe on the validation split
    # (benchmarks/learning_curve.py, docs/benchmarks.md "Budget").
    "steps": 200,
    # 4 prompts x 8 generations: the GRPO group size people use, for every sampling method.
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_completion_length": 48,
    # Demonstrations per optimizer step of every step that reads them: SFTTrainer's batch, UniAPL's decoupled SFT
    # batch (sft_per_device_train_batch_size, its default), the SFT phase of the staged methods.
    "sft_batch_size": 16,
    # Defaults of the tuned knobs; each grid point overrides the ones it tunes.
    "learning_rate": 1e-3,
    "sft_learning_rate": 2e-3,
    "adversarial_coef": 0.1,
    "discriminator_type": "shared",
    "adversarial_coef_mode": "fixed",
    # The library's default before these grids chose 1.0 (UniAPLConfig's default now). Every method that reads α
    # sets it at each grid point, so no run uses this value; it stays so that the committed runs' settings match.
    "sft_coef": 0.1,
    # Fixed a priori for every online-discriminator variant: the default 1e-5 barely moves a fresh discriminator in a
    # few hundred steps.
    "discriminator_learning_rate": 1e-3,
    # uniapl_fixed_ref's scorer: "embedded" (the learned one, `build_reference_scorer()`) or any `reference_scorer`.
    "reference_scorer": "embedded",
    # Share of the steps the staged methods spend in their SFT phase.
    "sft_fraction": 0.5,
    "num_validation": 200,
    "num_test": 400,
    "eval_max_new_tokens": 64,
    "num_demonstrations": 256,
    "num_preference": 512,
    "reward": "dense",
}
QUICK = {
    **FULL,
    "steps": 2,
    "per_device_train_batch_size": 16,  # 2 prompts x 8 generations: the group size stays 8
    "sft_batch_size": 4,
    "reference_scorer": "ngram_f1",  # no scorer to train: the pipeline check stays fast
    "max_completion_length": 16,
    "num_validation": 16,
    "num_test": 16,
    "eval_max_new_tokens": 16,
    "num_demonstrations": 16,
    "num_preference": 16,
}


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def _quiet(trainer):
    """Drop the PrinterCallback that `disable_tqdm=True` installs (it prints every log dict)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _common_args(settings: dict[str, Any], output_dir: str, seed: int, steps: int, learning_rate: float) -> dict:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_steps=steps,
        learning_rate=learning_rate,
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
    """Demonstrations each step that reads them reads: SFTTrainer's batch and UniAPL's decoupled SFT batch."""
    return settings["sft_batch_size"]


def demonstration_prompts_per_batch(settings: dict[str, Any]) -> int:
    """Demonstration prompts rolled out per generation batch at UniAPL's default `demonstration_ratio` 0.5."""
    prompts = settings["per_device_train_batch_size"] // settings["num_generations"]
    return min(max(round(0.5 * prompts), 1), prompts - 1)


def sft_phase_steps(settings: dict[str, Any]) -> int:
    """Optimizer steps of the staged methods' SFT phase: `sft_fraction` of the steps, at least one of each phase."""
    return min(max(1, round(settings["sft_fraction"] * settings["steps"])), settings["steps"] - 1)


def budget(method: str, settings: dict[str, Any]) -> dict[str, int]:
    """Optimizer steps, demonstrations read and sampled completions of one run of `method` (SFT phase shape too)."""
    steps, per_step = settings["steps"], demonstrations_per_step(settings)
    batch = settings["per_device_train_batch_size"]
    kind = protocol.method_kind(method)
    if kind == "sft":
        return {"optimizer_steps": steps, "demonstrations_seen": steps * per_step, "samples": 0}
    if kind == "grpo":
        return {"optimizer_steps": steps, "demonstrations_seen": 0, "samples": steps * batch}
    if kind in ("sft_then_grpo", "sft_then_agrpo"):
        sft_steps = sft_phase_steps(settings)
        return {
            "optimizer_steps": steps,
            "sft_steps": sft_steps,
            "demonstrations_seen": sft_steps * per_step,
            "samples": (steps - sft_steps) * batch,
        }
    if kind in ("uniapl", "uniapl_no_disc", "uniapl_fixed_ref"):
        return {"optimizer_steps": steps, "demonstrations_seen": steps * per_step, "samples": steps * batch}
    if kind == "luffy":
        # One expert completion replaces one rollout in each demonstration prompt's group.
        expert = demonstration_prompts_per_batch(settings)
        return {"optimizer_steps": steps, "demonstrations_seen": steps * expert, "samples": steps * (batch - expert)}
    raise ValueError(f"Unknown method {method!r}.")


def train_sft(model_path, tokenizer, demonstrations, settings, output_dir, seed, steps, learning_rate, batch_size,
              callbacks=None):  # fmt: skip
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(settings, output_dir, seed, steps, learning_rate),
        per_device_train_batch_size=batch_size,
        max_length=1024,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model_path,
        args=args,
        processing_class=tokenizer,
        train_dataset=demonstrations.select_columns(["prompt", "completion"]),
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


def train_grpo(model_path, tokenizer, prompts, settings, output_dir, seed, steps, learning_rate, callbacks=None):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**_common_args(settings, output_dir, seed, steps, learning_rate), **_grpo_args(settings))
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=[REWARDS[settings["reward"]]],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


def reference_scorer_available() -> bool:
    """Whether this version of UniAPLConfig has the fixed reference-conditioned scorer (`reference_scorer`)."""
    import dataclasses

    from trl_uniapl import UniAPLConfig

    return "reference_scorer" in {f.name for f in dataclasses.fields(UniAPLConfig)}


def available_methods() -> list[str]:
    """METHODS this version of trl_uniapl can train (`uniapl_fixed_ref` needs `UniAPLConfig.reference_scorer`)."""
    return [m for m in METHODS if m != "uniapl_fixed_ref" or reference_scorer_available()]


UNIAPL_PASSTHROUGH = ("discriminator_freeze_after_updates",)


def uniapl_options(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The UniAPLConfig options a UniAPL-trained method sets (everything else is UniAPLConfig's default)."""
    kind = protocol.method_kind(method)
    # UniAPLConfig options a variant regime's configuration may set beyond the settings (e.g. a frozen discriminator).
    extra = {key: settings[key] for key in UNIAPL_PASSTHROUGH if key in settings}
    online = dict(
        adversarial_coef=settings["adversarial_coef"],
        adversarial_coef_mode=settings["adversarial_coef_mode"],
        discriminator_learning_rate=settings["discriminator_learning_rate"],
        discriminator_type=settings["discriminator_type"],
    )
    # One stage: the SFT term from the first step (UniAPLConfig's default is the staged SFT -> A-GRPO).
    sft = dict(sft_coef=settings["sft_coef"], sft_per_device_train_batch_size=settings["sft_batch_size"],
               sft_warmup_steps=0)  # fmt: skip
    if kind == "uniapl":
        return {**sft, **online, **extra}
    if kind == "uniapl_no_disc":
        return {**sft, "adversarial_coef": 0.0, "adversarial_coef_mode": "fixed"}
    if kind == "uniapl_fixed_ref":
        if not reference_scorer_available():
            raise RuntimeError(
                "uniapl_fixed_ref needs UniAPLConfig.reference_scorer (the fixed reference-conditioned scorer), which "
                "this version of trl_uniapl does not have yet; leave the method out (--methods ...) until it lands."
            )
        scorer = settings["reference_scorer"]
        if scorer == "embedded":  # the embedded task's learned scorer, cached beside the student (default cache)
            from trl_uniapl.demo.reference_scorer import build_reference_scorer

            scorer = str(build_reference_scorer(progress=False))
        return {**sft, "adversarial_coef": settings["adversarial_coef"], "adversarial_coef_mode": "fixed",
                "reference_scorer": scorer}  # fmt: skip
    if kind in ("sft_then_grpo", "sft_then_agrpo"):
        staged = dict(
            sft_coef=0.0,
            sft_per_device_train_batch_size=settings["sft_batch_size"],
            sft_warmup_steps=sft_phase_steps(settings),
            sft_warmup_learning_rate=settings["sft_learning_rate"],
        )
        if kind == "sft_then_grpo":  # the staged start with λ = 0 (an opt-in variant; the method uses two trainers)
            return {**staged, "adversarial_coef": 0.0, "adversarial_coef_mode": "fixed"}
        return {**staged, **online}
    if kind == "luffy":
        return dict(sft_coef=0.0, sft_per_device_train_batch_size=None, sft_warmup_steps=0, adversarial_coef=0.0,
                    adversarial_coef_mode="fixed", expert_in_group=True)  # fmt: skip
    raise ValueError(f"{method!r} is not trained by UniAPLTrainer.")


def train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, options, callbacks=None):
    from trl_uniapl import UniAPLConfig, UniAPLTrainer

    args = UniAPLConfig(
        **_common_args(settings, output_dir, seed, steps, settings["learning_rate"]), **_grpo_args(settings), **options
    )
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=[REWARDS[settings["reward"]]],
        args=args,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer).train()
    return trainer


# Training logs kept per step: the evidence the issue asks for (tied groups, discriminator accuracy, r_adv, λ).
HISTORY_PREFIXES = (
    "loss",
    "reward",
    "rewards/",
    "frac_reward_zero_std",
    "sft/",
    "expert/",
    "discriminator/",
    "adversarial/",
    "completions/mean_length",
    "entropy",
    "step_time",
    "learning_rate",
)


def _history(trainer, step_offset: int = 0) -> list[dict[str, float]]:
    rows = []
    for entry in trainer.state.log_history:
        if "step" in entry and "loss" in entry:
            row = {
                key: float(value)
                for key, value in entry.items()
                if key.startswith(HISTORY_PREFIXES) and isinstance(value, (int, float))
            }
            row["step"] = entry["step"] + step_offset
            rows.append(row)
    return rows


def run_method(method, model_path, tokenizer, splits, settings, seed, work_dir, callbacks=None):
    """Train one method for `settings["steps"]` optimizer steps; return the trained model, logs and seconds.

    `callbacks` (TrainerCallbacks) are passed to the trainer; for `sft_then_grpo`, to both of its trainers, whose
    `state.global_step` restarts at 0 in the second one.
    """
    from datasets import concatenate_datasets

    steps, kind = settings["steps"], protocol.method_kind(method)
    output_dir = os.path.join(work_dir, f"{method}-seed{seed}")
    grpo_prompts = concatenate_datasets(
        [
            splits["preference"],
            splits["demonstrations"].remove_columns("completion").cast(splits["preference"].features),
        ]
    )
    lr = settings["learning_rate"]
    start = time.perf_counter()
    if kind == "sft":
        trainer = train_sft(model_path, tokenizer, splits["demonstrations"], settings, output_dir, seed, steps, lr,
                            demonstrations_per_step(settings), callbacks)  # fmt: skip
        history = _history(trainer)
    elif kind == "grpo":
        trainer = train_grpo(model_path, tokenizer, grpo_prompts, settings, output_dir, seed, steps, lr, callbacks)
        history = _history(trainer)
    elif kind == "sft_then_grpo":
        sft_steps = sft_phase_steps(settings)
        first = train_sft(model_path, tokenizer, splits["demonstrations"], settings, output_dir + "-sft", seed,
                          sft_steps, settings["sft_learning_rate"], demonstrations_per_step(settings),
                          callbacks)  # fmt: skip
        history = _history(first)
        stage_dir = output_dir + "-sft-model"
        first.save_model(stage_dir)
        tokenizer.save_pretrained(stage_dir)
        del first
        trainer = train_grpo(stage_dir, tokenizer, grpo_prompts, settings, output_dir, seed, steps - sft_steps, lr,
                             callbacks)  # fmt: skip
        history += _history(trainer, step_offset=sft_steps)
    elif kind in ("sft_then_agrpo", "uniapl", "uniapl_no_disc", "uniapl_fixed_ref", "luffy"):
        options = uniapl_options(method, settings)
        trainer = train_uniapl(model_path, tokenizer, splits, settings, output_dir, seed, steps, options, callbacks)
        history = _history(trainer)
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    train_seconds = time.perf_counter() - start
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model, history, train_seconds


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, eval_set, settings, starting_model=None) -> dict[str, Any]:
    """The project's evaluation (greedy `evaluate_ifeval`, `expert_logprob`) plus the per-prompt records, and with a
    `starting_model` the KL from it along the policy's responses (`kl_to_start`, `kl_to_reference`)."""
    from trl_uniapl.ifeval.evaluation import evaluate_ifeval, expert_logprob, kl_to_reference

    start = time.perf_counter()
    results = evaluate_ifeval(
        model, tokenizer, eval_set, max_new_tokens=settings["eval_max_new_tokens"], batch_size=200, show_progress=False
    )
    prompts = eval_set["prompt"]
    expert = expert_logprob(model, tokenizer, prompts, eval_set["expert_completion"], batch_size=100)
    metrics = {key: results[key] for key in METRICS}
    metrics.update(
        topic_accuracy=results["topic_accuracy"],
        unrequested_effect_rate_mean=results["unrequested_effect_rate_mean"],
        unrequested_effect_rate=results["unrequested_effect_rate"],
        mean_response_tokens=results["mean_response_tokens"],
        length_wasserstein_to_expert=results["length_wasserstein_to_expert"],
        expert_logp=float(np.mean(expert)),
        prompt_level_strict_acc_by_group=results.get("prompt_level_strict_acc_by_group"),
        distinct_2=distinct_ngrams(results["responses"], 2),
    )
    if starting_model is not None:
        metrics["kl_to_start"] = kl_to_reference(model, starting_model, tokenizer, prompts, results["responses"], 100)
    per_prompt = per_prompt_records(
        list(eval_set), results["responses"], results["response_lengths"], results["expert_response_lengths"], expert
    )
    return {
        "metrics": metrics,
        "per_prompt": per_prompt,
        "sample_responses": results["responses"][:5],
        "eval_seconds": time.perf_counter() - start,
    }


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
    return {**_ifeval_metrics(strict, loose), "reply": reply}


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def student_and_splits(args, settings: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """The cached student (`--student_cache`, `--student_fast`), its tokenizer and the protocol's splits of
    `--data_seed` at the regime's sizes: what every benchmark run starts from."""
    from transformers import AutoTokenizer

    from trl_uniapl.demo import student as student_lib

    model_path = student_lib.build_student(cache_dir=args.student_cache, fast=args.student_fast, show_progress=False)
    splits = protocol.make_protocol_splits(
        args.data_seed,
        settings["num_demonstrations"],
        settings["num_preference"],
        settings["num_validation"],
        settings["num_test"],
    )
    return model_path, AutoTokenizer.from_pretrained(model_path), splits


def student_digest(model_path: str) -> str:
    """SHA-256 of the student's weights: runs are comparable (and copied between regimes) only on the same student."""
    digest = hashlib.sha256()
    with open(os.path.join(model_path, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_student(store: protocol.RunStore, model_path: str) -> str:
    """Record the student of a regime's runs on its first run, and refuse to add runs made on another student."""
    sha = student_digest(model_path)
    recorded = store.recorded_student()
    if recorded is None:
        if os.path.isdir(os.path.join(store.root, "runs")):
            raise SystemExit(
                f"{store.root} holds runs but no record of their student (`student.sha256`): write that student's "
                f"SHA-256 there if you know it (this machine's is {sha}), or use another --output_dir."
            )
        os.makedirs(store.root, exist_ok=True)
        temporary = os.path.join(store.root, f"student.sha256.tmp{os.getpid()}")
        with open(temporary, "w") as f:  # the --jobs workers both record it: atomically, with the same content
            f.write(f"{sha}  {os.path.join(model_path, 'model.safetensors')}\n")
        os.replace(temporary, os.path.join(store.root, "student.sha256"))
    elif recorded != sha:
        raise SystemExit(
            f"{store.root} holds runs made on the student {recorded[:8]}…, but this machine's student is {sha[:8]}…: "
            f"runs on different students are not paired. Use another --output_dir (or that student's cache)."
        )
    return sha


def reuse_base_runs(args, store: protocol.RunStore, grid, grid_seeds, seeds, student_sha: str) -> None:
    """A variant regime's configurations that the base regime already ran are copied, not trained again, but only
    when the base regime ran on the same student: otherwise they are trained here, so that every run compared in
    this regime starts from one student."""
    base = protocol.RunStore(base_dir(args))
    base_student = base.recorded_student()
    if base_student is not None and base_student != student_sha:
        print(
            f"not reusing the runs of {base.root}: they were made on the student {base_student[:8]}…, this regime "
            f"runs on {student_sha[:8]}…; its reference configurations are trained here",
            flush=True,
        )
        return
    for method in (m for m in grid if m in protocol.METHODS):  # copied only where the configuration is the same
        copied = protocol.reuse_runs(base, store, method, grid[method][0], grid_seeds, seeds)
        print(f"reused {copied} finished {method} runs of {base.root}", flush=True)


def regime_settings(args) -> dict[str, Any]:
    settings = dict(QUICK if args.quick else FULL)
    regime = args.base.removeprefix("edges-") if args.regime in protocol.VARIANT_REGIMES else args.regime
    settings.update(protocol.REGIMES[regime])
    apply_overrides(settings, args.set)
    if args.steps is not None:
        settings["steps"] = args.steps
    return settings


def base_dir(args) -> str:
    """The folder of a variant regime's base regime (`--base`)."""
    return os.path.join(args.output_dir, args.base + ("-quick" if args.quick else ""))


def regime_dir(args) -> str:
    name = f"{args.regime}-{args.base}" if args.regime in protocol.VARIANT_REGIMES else args.regime
    return os.path.join(args.output_dir, name + ("-quick" if args.quick else ""))


def regime_grid(args, settings) -> dict[str, list[dict[str, Any]]]:
    if args.regime in protocol.VARIANT_REGIMES:
        base = base_dir(args)
        selection_path = protocol.RunStore(base).selection_path
        selection = protocol.read_json(selection_path) if os.path.exists(selection_path) else {}
        if "uniapl" not in selection:
            raise SystemExit(
                f"--regime {args.regime} --base {args.base} starts from UniAPL's configuration selected on "
                f"validation in {base}: run `--regime {args.base} --phase grid` first."
            )
        base_settings = protocol.read_json(os.path.join(base, "settings.json"))
        if base_settings != settings:
            raise SystemExit(f"The base regime in {base} ran with other settings; use the same --steps/--set.")
        variants = protocol.VARIANT_REGIMES[args.regime](selection)
        if args.methods is not None:  # only the variants of those names
            unknown = sorted(set(args.methods) - set(variants))
            if unknown:
                raise SystemExit(
                    f"--methods {unknown}: not variants of --regime {args.regime}; choose from {list(variants)}."
                )
            variants = {name: configs for name, configs in variants.items() if name in args.methods}
        return variants
    methods = args.methods if args.methods is not None else protocol.REGIME_METHODS[args.regime]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods {unknown}: unknown; choose from {list(METHODS)}.")
    grid = protocol.grids(args.regime)
    return {method: grid[method] for method in methods}


def _without_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """`argv` without the given options and their values (`{"--jobs": 1}`: the option and one value)."""
    kept, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        name = item.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in item else options[name]
            continue
        kept.append(item)
    return kept


def run_in_processes(argv: list[str], args, store: protocol.RunStore, grid, grid_seeds) -> None:
    """`--jobs N`: N worker processes for the grid, the selection, then N workers for the test runs.

    The workers of a phase share its runs still to do as a queue (`run_protocol(claim=...)`, through a claims folder
    of that phase): each takes the next run no other has taken, with `cpu_count // N` threads (the student is so
    small that one process leaves cores idle between its many small operations). Logs go to `<regime>/logs/`; a
    failed worker leaves its finished runs on disk.
    """
    base = _without_options(argv, {"--jobs": 1, "--phase": 1, "--shard": 1, "--claims": 1})
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    os.makedirs(os.path.join(store.root, "logs"), exist_ok=True)
    for phase in {"all": ("grid", "test"), "grid": ("grid",), "test": ("test",)}[args.phase]:
        workers = []
        claims = tempfile.mkdtemp(prefix=f"uniapl-claims-{phase}-")  # fresh per phase: no claim outlives its command
        for index in range(args.jobs):
            log = open(os.path.join(store.root, "logs", f"{phase}-shard{index}.txt"), "a")
            command = [sys.executable, os.path.abspath(__file__), *base, "--phase", phase, "--shard",
                       f"{index}/{args.jobs}", "--claims", claims]  # fmt: skip
            print(f"{phase} shard {index}/{args.jobs}: log {log.name}", flush=True)
            workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment), log))
        failed = []
        for index, (process, log) in enumerate(workers):
            process.wait()
            log.close()
            if process.returncode != 0:
                failed.append(index)
        shutil.rmtree(claims, ignore_errors=True)
        if failed:
            raise RuntimeError(
                f"{phase} shards {failed} failed (logs in {store.root}/logs); the finished runs are on disk: rerun "
                f"the same command to continue."
            )
        if phase == "grid":  # the grid shards each saw only part of the grid: select once all are finished
            selection = protocol.select(protocol.load_grid_runs(store, grid, grid_seeds), grid)
            store.write_selection(selection, grid)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", default="default", choices=[*protocol.REGIMES, *protocol.VARIANT_REGIMES])
    parser.add_argument(
        "--base",
        default="default",
        choices=[*protocol.REGIMES, *(f"edges-{regime}" for regime in protocol.REGIMES)],
        help=f"Base regime of the variant regimes ({', '.join(protocol.VARIANT_REGIMES)}); its grid phase must be "
        "finished. `edges-<regime>` starts from the selection after the grids were closed (e.g. the λ sweep at "
        "UniAPL's α selected there, or the `edges` regime once more).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny settings (a few minutes): checks the pipeline.")
    parser.add_argument("--seeds", type=int, default=None, help="Test seeds per selected configuration (default 5).")
    parser.add_argument("--grid_seeds", type=int, default=1, help="Seeds per grid point on validation (default 1).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (the budget knob).")
    parser.add_argument(
        "--phase",
        default="all",
        choices=("all", "grid", "test"),
        help="'grid': stop after the selection; 'test': only the test runs (the grid must be finished).",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Processes side by side, each with its share of the CPU threads and every n-th run of each phase (the "
        "grid, then the test runs); 1: one process, runs in turn.",
    )
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n": set by --jobs for its workers
    parser.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # the phase's claims folder, set by --jobs
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"Methods to run ({', '.join(METHODS)}); default: those with a grid of their own in the regime "
        "(`quality_protocol.REGIME_METHODS`; the others run at UniAPL's selection in the variant regimes). In a "
        "variant regime, the names of its variants (e.g. sft_then_agrpo_switch25); default: all of them.",
    )
    parser.add_argument("--output_dir", default="benchmarks/results/quality_protocol", help="Parent of the regimes.")
    parser.add_argument(
        "--report",
        "--merge",
        dest="report",
        action="store_true",
        help="Only build quality.json/.md (and the plot) from the finished runs; marks what is missing.",
    )
    parser.add_argument("--data_seed", type=int, default=0, help="Seed of the task splits (same for every method).")
    parser.add_argument("--num_bootstrap", type=int, default=1000)
    parser.add_argument("--student_fast", action="store_true", help="Use the much smaller test student.")
    parser.add_argument("--student_cache", default=None, help="Cache dir of the student (default $TRL_UNIAPL_CACHE).")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override a setting, e.g. steps=60.")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 5)))
    grid_seeds = list(range(args.grid_seeds))
    settings = regime_settings(args)
    settings["data_seed"] = args.data_seed
    store = protocol.RunStore(regime_dir(args))
    grid = regime_grid(args, settings)
    extra = {
        "regime": args.regime,
        "base": args.base if args.regime in protocol.VARIANT_REGIMES else None,
        "settings": settings,
        "grid_size": protocol.GRID_SIZE,
    }
    reference_path = os.path.join(store.root, "reference.json")
    # Every run on disk (a committed regime, rerun from a clone): nothing to train, so no student to build or check;
    # the report is rebuilt from the runs as they are.
    if not args.report and protocol.finished(store, grid, grid_seeds, seeds):
        store.check_settings(settings)  # the runs' settings.json exists: a rerun with other settings is still refused
        print(f"{store.root}: every run is finished; rebuilding the report only", flush=True)
        args.report = True
    if args.report:
        if os.path.exists(reference_path):
            extra["reference"] = protocol.read_json(reference_path)
        return protocol.report(store, grid, grid_seeds, seeds, extra, args.num_bootstrap)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}.")
    store.check_settings(settings)
    if args.jobs > 1:
        if args.regime in protocol.VARIANT_REGIMES:  # before the workers start: they queue the runs still to do
            from trl_uniapl.demo import student as student_lib

            model_path = student_lib.build_student(cache_dir=args.student_cache, fast=args.student_fast)
            reuse_base_runs(args, store, grid, grid_seeds, seeds, record_student(store, model_path))
        run_in_processes(argv if argv is not None else sys.argv[1:], args, store, grid, grid_seeds)
        if os.path.exists(reference_path):
            extra["reference"] = protocol.read_json(reference_path)
        out = protocol.report(store, grid, grid_seeds, seeds, extra, args.num_bootstrap)
        print(protocol.markdown(out))
        return out
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else (0, 1)

    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    wall_start = time.perf_counter()
    model_path, tokenizer, splits = student_and_splits(args, settings)
    student_sha = record_student(store, model_path)
    if args.regime in protocol.VARIANT_REGIMES and not args.shard:  # with --jobs, the parent did it
        reuse_base_runs(args, store, grid, grid_seeds, seeds, student_sha)

    if not os.path.exists(reference_path) and shard[0] == 0:  # the untrained student and a constant reply
        initial = AutoModelForCausalLM.from_pretrained(model_path)
        reference = {
            split: {
                "student": evaluate(initial, tokenizer, splits[split], settings)["metrics"],
                "constant_reply": score_constant_reply(splits[split]),
            }
            for split in ("validation", "test")
        }
        protocol.write_json(reference_path, {**reference, "machine": machine(), "student": model_path})
        del initial

    def train_and_evaluate(method: str, config: dict[str, Any], seed: int, split: str) -> dict[str, Any]:
        run_settings = {**settings, **config}
        work_dir = tempfile.mkdtemp(prefix="uniapl-quality-")
        try:
            torch.manual_seed(seed)
            model, history, train_seconds = run_method(
                method, model_path, tokenizer, splits, run_settings, seed, work_dir
            )
            starting_model = AutoModelForCausalLM.from_pretrained(model_path)
            evaluation = evaluate(model, tokenizer, splits[split], run_settings, starting_model)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        m = evaluation["metrics"]
        print(
            f"[{time.perf_counter() - wall_start:6.0f}s] {method} {protocol.config_id(config)} seed {seed} on "
            f"{split}: prompt strict {m['prompt_level_strict_acc']:.3f} inst {m['inst_level_strict_acc']:.3f} "
            f"W1 {m['length_wasserstein_to_expert']:.2f} train {train_seconds:.0f}s",
            flush=True,
        )
        return {
            **evaluation,
            "history": history,
            "train_seconds": train_seconds,
            "budget": budget(method, run_settings),
            "machine_load": os.getloadavg(),
        }

    protocol.run_protocol(
        store,
        grid,
        train_and_evaluate,
        grid_seeds,
        seeds,
        phase=args.phase,
        log=lambda line: print(line, flush=True),
        shard=shard,
        claim=protocol.claimer(args.claims) if args.claims else None,
    )
    if args.shard:  # a worker of --jobs: the parent reports once every shard has finished
        return {}
    extra["reference"] = protocol.read_json(reference_path)
    out = protocol.report(store, grid, grid_seeds, seeds, extra, args.num_bootstrap)
    print(protocol.markdown(out))
    return out


if __name__ == "__main__":
    main()
