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
    python benchmarks/learning_curve.py --cost                                 # the cost–quality curves (idle machine)

`--cost` trains the core methods at their selected configurations instead (COST_RUNS) and adds what each costs to
reach the best two-stage pipeline's final validation score, and `cost_curves.png` (accuracy against steps, sampled
completions and train seconds), in `benchmarks/results/cost_curves/`.
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
# The cost–quality curves (issue 21, item 4): each core method at its configuration selected on validation (the
# default regime's `selection.json`; UniAPL's from `edges-edges-default`, its grid closed twice, at α 9), the
# protocol's 200 steps, evaluated every 25 steps. Run alone on an otherwise idle machine, so that seconds compare.
COST_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "cost_sft": ("sft", {"learning_rate": 4e-3}),
    "cost_grpo": ("grpo", {"learning_rate": 1e-4}),
    "cost_sft_then_grpo": ("sft_then_grpo", {"sft_learning_rate": 4e-3, "learning_rate": 5e-4}),
    "cost_sft_then_agrpo": ("sft_then_agrpo", {"sft_learning_rate": 4e-3, "learning_rate": 5e-4}),
    "cost_uniapl": ("uniapl", {"learning_rate": 2e-3, "sft_coef": 9.0}),
}
COST_CHECKPOINTS = tuple(range(25, 201, 25))
# The best two-stage pipeline, whose final validation score the other curves are read against.
COST_TARGET_RUN = "cost_sft_then_agrpo"
ALL_RUNS = {**RUNS, **COST_RUNS}
CHECKPOINTS = (100, 200, 400, 600, 800)
# UniAPL's step costs about ten SFT steps (generation of 32 completions); its curve stops earlier.
RUN_CHECKPOINTS = {
    "uniapl_default_lr1e-3": (100, 200, 400),
    **{f"uniapl_a1_sft{size}": (100, 200) for size in SFT_BATCH_SIZES},
    **{run: COST_CHECKPOINTS for run in COST_RUNS},
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
    point at once (the seconds of evaluation are not counted in the training seconds it records).

    Steps are counted across trainers (`sft_then_grpo` runs two, and the second's `global_step` restarts at 0)."""

    def __init__(self, steps, write):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_step_end(inner, args, state, control, model=None, **kwargs):  # noqa: N805
                self.done += 1
                if self.done in self.steps:
                    self.write(self.done, model, state)
                return control

        self.steps, self.write, self.done = set(steps), write, 0
        self.callback = _Callback()


def budget_to_step(method: str, run_settings: dict[str, Any], step: int) -> dict[str, int]:
    """`quality.budget` of a run's first `step` steps: a staged run spends its first `sft_steps` steps of the WHOLE
    run on demonstrations only, the other methods the same per step throughout."""
    whole = quality.budget(method, run_settings)
    if "sft_steps" in whole:
        sft_steps = min(step, whole["sft_steps"])
        per_step = quality.demonstrations_per_step(run_settings)
        rollouts_per_step = run_settings["per_device_train_batch_size"]
        return {"optimizer_steps": step, "sft_steps": sft_steps, "demonstrations_seen": sft_steps * per_step,
                "samples": (step - sft_steps) * rollouts_per_step}  # fmt: skip
    return {key: value * step // whole["optimizer_steps"] for key, value in whole.items()}


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
            "budget_to_step": budget_to_step(method, run_settings, step),
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
            out["runs"][run] = {"method": ALL_RUNS[run][0], "config": ALL_RUNS[run][1], "points": points}
    if COST_TARGET_RUN in out["runs"]:
        out["cost_to_reach"] = cost_to_reach(out["runs"])
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
    if "cost_to_reach" in out:
        lines += cost_lines(out["cost_to_reach"])
        if plot_cost_curves(out, output_dir):
            lines += ["", "![](cost_curves.png)"]
    with open(os.path.join(output_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def cost_to_reach(runs: dict[str, Any]) -> dict[str, Any]:
    """What each curve costs to first reach the final validation score of the best two-stage pipeline
    (COST_TARGET_RUN's last point): the step, samples and train seconds of its first point at or above it, and those
    seconds over the pipeline's own. None where a curve never gets there."""
    target_point = runs[COST_TARGET_RUN]["points"][-1]
    target = target_point["prompt_level_strict_acc"]
    out = {"target_run": COST_TARGET_RUN, "target": target, "runs": {}}
    for run, entry in runs.items():
        reached = next((p for p in entry["points"] if p["prompt_level_strict_acc"] >= target), None)
        out["runs"][run] = None if reached is None else {
            "step": reached["step"],
            "samples": reached["samples"],
            "train_seconds": reached["train_seconds_to_step"],
            "seconds_over_target": reached["train_seconds_to_step"] / target_point["train_seconds_to_step"],
        }  # fmt: skip
    return out


def cost_lines(reach: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Cost to reach {reach['target_run']}'s final validation score ({reach['target'] * 100:.1f}%)",
        "",
        "| run | first step at or above | samples | train s | train s / the pipeline's |",
        "|---|---|---|---|---|",
    ]
    for run, hit in reach["runs"].items():
        if hit is None:
            lines.append(f"| {run} | not reached | – | – | – |")
        else:
            lines.append(
                f"| {run} | {hit['step']} | {hit['samples']} | {hit['train_seconds']:.0f} | "
                f"{hit['seconds_over_target']:.2f} |"
            )
    return lines


def plot_cost_curves(out: dict[str, Any], output_dir: str) -> bool:
    """Validation accuracy of the cost runs against optimizer steps, samples and train seconds (`cost_curves.png`);
    False where matplotlib is not installed (the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    axes_keys = (("step", "optimizer steps"), ("samples", "sampled completions (rollouts)"),
                 ("train_seconds_to_step", "train seconds (idle machine)"))  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for run, entry in out["runs"].items():
        if run not in COST_RUNS:
            continue
        for axis, (key, _) in zip(axes, axes_keys):
            accuracy = [p["prompt_level_strict_acc"] * 100 for p in entry["points"]]
            axis.plot([p[key] for p in entry["points"]], accuracy, marker="o", markersize=3,
                      label=run.removeprefix("cost_"))  # fmt: skip
    for axis, (_, label) in zip(axes, axes_keys):
        axis.axhline(out["cost_to_reach"]["target"] * 100, color="grey", linestyle=":", linewidth=1)
        if out.get("reference"):
            axis.axhline(out["reference"]["prompt_level_strict_acc"] * 100, color="black", linewidth=0.8)
        axis.set_xlabel(label)
    axes[0].set_ylabel("validation prompt-level strict %")
    axes[0].legend(fontsize=8)
    figure.suptitle("Cost–quality curves: dotted, the staged SFT → A-GRPO's final score; solid, the untrained student")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "cost_curves.png"), dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=None, choices=list(ALL_RUNS))
    parser.add_argument(
        "--cost",
        action="store_true",
        help="The cost–quality curves (COST_RUNS, every 25 steps) instead of the budget probe; run alone on an idle "
        "machine. Output: benchmarks/results/cost_curves.",
    )
    parser.add_argument("--checkpoints", nargs="+", type=int, default=None, help="Steps to evaluate at (all runs).")
    parser.add_argument("--output_dir", default=None, help="Default: benchmarks/results/learning_curve (cost_curves).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="quality.py's QUICK settings (pipeline check).")
    parser.add_argument("--student_fast", action="store_true")
    parser.add_argument("--student_cache", default=None)
    parser.add_argument("--report", action="store_true", help="Only build curve.json / curve.md from disk.")
    args = parser.parse_args(argv)
    runs = list(COST_RUNS if args.cost else RUNS)
    args.runs = args.runs or runs
    args.output_dir = args.output_dir or os.path.join(
        "benchmarks/results", "cost_curves" if args.cost else "learning_curve"
    )
    os.makedirs(args.output_dir, exist_ok=True)

    def checkpoints_of(run):
        return tuple(args.checkpoints) if args.checkpoints else RUN_CHECKPOINTS.get(run, CHECKPOINTS)

    settings = {**(quality.QUICK if args.quick else quality.FULL), **protocol.REGIMES["default"]}
    reference_path = os.path.join(args.output_dir, "reference.json")
    if args.report:
        reference = protocol.read_json(reference_path) if os.path.exists(reference_path) else None
        return report(args.output_dir, runs, checkpoints_of, reference)

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
    student = quality.student_digest(model_path)  # points compare only on the same student
    protocol.write_json(
        os.path.join(args.output_dir, "settings.json"), {**settings, "data_seed": args.data_seed, "student": student}
    )
    for run in args.runs:
        method, overrides = ALL_RUNS[run]
        run_curve(
            run, method, overrides, checkpoints_of(run), settings, model_path, tokenizer, splits, args.output_dir,
            args.seed, log,
        )  # fmt: skip
        report(args.output_dir, runs, checkpoints_of, protocol.read_json(reference_path))
    return report(args.output_dir, runs, checkpoints_of, protocol.read_json(reference_path))


if __name__ == "__main__":
    main()
