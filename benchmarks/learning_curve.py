"""Learning-curve probe: validation accuracy of SFT-type runs at several step counts, to choose the protocol's budget.

Issue 21, item 2: the number of optimizer steps of the quality protocol is chosen where the best SFT-type method has
flattened. Each probe run trains ONCE for the largest step count and is evaluated on the VALIDATION split (never the
test split) at every checkpoint step along the way: one run per curve, not one run per point. The learning rate
follows the protocol's linear decay over the run's full length, so a checkpoint before the end was taken at a higher
learning rate than a run of that length would end with; the curve is therefore a lower bound on a shorter run's
accuracy, and its last point is an ordinary run of the protocol at that budget.

Every point is written to its own JSON file as soon as it is evaluated (`<output_dir>/<run>/step<N>.json`); a run
whose points are all on disk is skipped, a run with some points missing is trained again from the start (same seed,
same data, so the same trajectory) and only the missing points are evaluated and written.

    OMP_NUM_THREADS=1 python benchmarks/learning_curve.py                      # the probe of docs/benchmarks.md
    python benchmarks/learning_curve.py --runs sft_lr2e-3 --checkpoints 100 200   # part of it
    python benchmarks/learning_curve.py --report                               # curve.json / curve.md from disk
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers in benchmarks/
import quality  # noqa: E402
import quality_protocol as protocol  # noqa: E402
from common import machine, quiet_libraries  # noqa: E402

# The probe's runs: the method (a quality.py method) and its overrides of the protocol's settings. SFT at the two
# learning rates the 200-step indications found best (15.8% at 1e-3, 20.4% at 2e-3), and UniAPL at the
# library's defaults (α 0.1, λ 0.1, 16 demonstrations per step) at the learning rate.
SFT_BATCH_SIZES = (4, 16, 32)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft_lr2e-3": ("sft", {"learning_rate": 2e-3}),
    "sft_lr1e-3": ("sft", {"learning_rate": 1e-3}),
    "uniapl_default_lr1e-3": ("uniapl", {"learning_rate": 1e-3}),
    # The SFT batch-size probe (issue 19: the default of `sft_per_device_train_batch_size`): UniAPL at the issue's
    # indication (α 1, λ 0.1, lr 1e-3) with 4, 16 and 32 demonstrations per step.
    **{
        f"uniapl_a1_sft{size}": ("uniapl", {"learning_rate": 1e-3, "sft_coef": 1.0, "sft_batch_size": size})
        for size in SFT_BATCH_SIZES
    },
}
CHECKPOINTS = (100, 200, 400, 600, 800)
# UniAPL's step costs about ten SFT steps (generation of 32 completions); its curve stops earlier.
RUN_CHECKPOINTS = {
    "uniapl_default_lr1e-3": (100, 200, 400),
    **{f"uniapl_a1_sft{size}": (100, 200) for size in SFT_BATCH_SIZES},
}
CURVE_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "unrequested_effect_rate_mean",
    "length_wasserstein_to_expert",
    "expert_logp",
    "kl_to_start",
)


def point_path(output_dir: str, run: str, step: int) -> str:
    return os.path.join(output_dir, run, f"step{step}.json")


class EvaluateAt:
    """A TrainerCallback that evaluates the policy on the validation split at given optimizer steps and writes each
    point at once (the seconds of evaluation are not counted in the training seconds it records)."""

    def __init__(self, steps, write):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_step_end(inner, args, state, control, model=None, **kwargs):  # noqa: N805
                if state.global_step in self.steps:
                    self.write(state.global_step, model, state)
                return control

        self.steps, self.write = set(steps), write
        self.callback = _Callback()


def run_curve(run, method, overrides, checkpoints, settings, model_path, tokenizer, splits, output_dir, seed, log):
    missing = [s for s in checkpoints if not os.path.exists(point_path(output_dir, run, s))]
    if not missing:
        log(f"{run}: every point on disk, skipped")
        return
    from transformers import AutoModelForCausalLM

    run_settings = {**settings, **overrides, "steps": max(checkpoints)}
    starting_model = AutoModelForCausalLM.from_pretrained(model_path)
    start = time.perf_counter()
    eval_seconds = [0.0]

    def write(step, model, state):
        if step not in missing:
            return
        began = time.perf_counter()
        evaluation = quality.evaluate(model, tokenizer, splits["validation"], run_settings, starting_model)
        eval_seconds[0] += time.perf_counter() - began
        m = evaluation["metrics"]
        record = {
            "run": run,
            "method": method,
            "config": overrides,
            "seed": seed,
            "split": "validation",
            "step": step,
            "run_steps": run_settings["steps"],
            "learning_rate_at_step": state.log_history[-1].get("learning_rate") if state.log_history else None,
            "train_seconds_to_step": time.perf_counter() - start - eval_seconds[0],
            "budget_to_step": quality.budget(method, {**run_settings, "steps": step}),
            "metrics": m,
            "per_prompt": evaluation["per_prompt"],
            "sample_responses": evaluation["sample_responses"],
            "eval_seconds": evaluation["eval_seconds"],
            "machine_load": os.getloadavg(),
        }
        protocol.write_json(point_path(output_dir, run, step), record)
        log(
            f"{run} step {step}: prompt strict {m['prompt_level_strict_acc']:.3f}"
            f" inst {m['inst_level_strict_acc']:.3f}"
            f" W1 {m['length_wasserstein_to_expert']:.2f} effects {m['unrequested_effect_rate_mean']:.3f}"
            f" train {record['train_seconds_to_step']:.0f}s"
        )

    import torch

    callback = EvaluateAt(missing, write).callback
    with tempfile.TemporaryDirectory(prefix="uniapl-curve-") as work_dir:
        torch.manual_seed(seed)
        quality.run_method(method, model_path, tokenizer, splits, run_settings, seed, work_dir, callbacks=[callback])


def report(output_dir: str, runs, checkpoints_of, reference) -> dict[str, Any]:
    out = {"runs": {}, "reference": reference}
    for run in runs:
        points = []
        for step in checkpoints_of(run):
            if os.path.exists(path := point_path(output_dir, run, step)):
                record = protocol.read_json(path)
                points.append(
                    {
                        "step": step,
                        **{k: record["metrics"].get(k) for k in CURVE_METRICS},
                        "train_seconds_to_step": record["train_seconds_to_step"],
                        "samples": record["budget_to_step"].get("samples"),
                        "demonstrations_seen": record["budget_to_step"].get("demonstrations_seen"),
                    }
                )
        if points:
            out["runs"][run] = {"method": RUNS[run][0], "config": RUNS[run][1], "points": points}
    protocol.write_json(os.path.join(output_dir, "curve.json"), out)
    lines = ["# Learning-curve probe (validation split, seed 0)", ""]
    if reference:
        lines += [f"Untrained student: {reference['prompt_level_strict_acc'] * 100:.1f}% prompt strict.", ""]
    lines += [
        "| run | step | prompt strict % | inst strict % | unrequested effects % | length W1 | expert log-prob | "
        "KL to start | train s to step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, entry in out["runs"].items():
        for p in entry["points"]:
            lines.append(
                f"| {run} | {p['step']} | {p['prompt_level_strict_acc'] * 100:.1f} | "
                f"{p['inst_level_strict_acc'] * 100:.1f} | {p['unrequested_effect_rate_mean'] * 100:.1f} | "
                f"{p['length_wasserstein_to_expert']:.2f} | {p['expert_logp']:.3f} | "
                f"{'–' if p['kl_to_start'] is None else format(p['kl_to_start'], '.3f')} | "
                f"{p['train_seconds_to_step']:.0f} |"
            )
    with open(os.path.join(output_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--checkpoints", nargs="+", type=int, default=None, help="Steps to evaluate at (all runs).")
    parser.add_argument("--output_dir", default="benchmarks/results/learning_curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="quality.py's QUICK settings (pipeline check).")
    parser.add_argument("--student_fast", action="store_true")
    parser.add_argument("--student_cache", default=None)
    parser.add_argument("--report", action="store_true", help="Only build curve.json / curve.md from disk.")
    args = parser.parse_args(argv)

    def checkpoints_of(run):
        return tuple(args.checkpoints) if args.checkpoints else RUN_CHECKPOINTS.get(run, CHECKPOINTS)

    settings = {**(quality.QUICK if args.quick else quality.FULL), **protocol.REGIMES["default"]}
    reference_path = os.path.join(args.output_dir, "reference.json")
    if args.report:
        reference = protocol.read_json(reference_path) if os.path.exists(reference_path) else None
        return report(args.output_dir, list(RUNS), checkpoints_of, reference)

    from transformers import AutoModelForCausalLM

    quiet_libraries()
    wall = time.perf_counter()

    def log(line):
        print(f"[{time.perf_counter() - wall:6.0f}s] {line}", flush=True)

    model_path, tokenizer, splits = quality.student_and_splits(args, settings)
    if not os.path.exists(reference_path):
        initial = AutoModelForCausalLM.from_pretrained(model_path)
        metrics = quality.evaluate(initial, tokenizer, splits["validation"], settings)["metrics"]
        protocol.write_json(reference_path, {**metrics, "split": "validation", "machine": machine()})
        log(f"untrained student on validation: prompt strict {metrics['prompt_level_strict_acc']:.3f}")
        del initial
    protocol.write_json(os.path.join(args.output_dir, "settings.json"), {**settings, "data_seed": args.data_seed})
    for run in args.runs:
        method, overrides = RUNS[run]
        run_curve(
            run, method, overrides, checkpoints_of(run), settings, model_path, tokenizer, splits, args.output_dir,
            args.seed, log,
        )  # fmt: skip
        report(args.output_dir, list(RUNS), checkpoints_of, protocol.read_json(reference_path))
    return report(args.output_dir, list(RUNS), checkpoints_of, protocol.read_json(reference_path))


if __name__ == "__main__":
    main()
