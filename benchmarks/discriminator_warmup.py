"""How many policy steps the discriminator needs before its reward means something: the measurement behind the default
`discriminator_warmup_steps`.

Runs the demo's settings (embedded task, student model, CPU) with λ held at 0 for the whole run, so the policy trains
on GRPO + SFT only while the discriminator learns, and records the discriminator's balanced accuracy after each
update. The discriminator has left chance at the first update whose balanced accuracy, averaged with the previous
update's, is at least 0.6; the script reports that update's index and step.

    python benchmarks/discriminator_warmup.py --seeds 0 1 --max_steps 40
    python benchmarks/discriminator_warmup.py --analyse DIR/discriminator_warmup.json   # re-read a finished run
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, quiet_libraries  # noqa: E402


def left_chance(steps: list[int], accuracies: list[float], threshold: float = 0.6) -> dict | None:
    """The first update (1-based) whose balanced accuracy, averaged with the previous update's, reaches `threshold`:
    one lucky batch is not enough, two in a row are."""
    for index in range(1, len(accuracies)):
        if (accuracies[index - 1] + accuracies[index]) / 2 >= threshold:
            return {"update": index + 1, "step": steps[index]}
    return None


def run(seed: int, max_steps: int, output_dir: str) -> dict:
    from trl_uniapl.cli import demo_config
    from trl_uniapl.demo.student import build_student
    from trl_uniapl.ifeval.rewards import ifeval_dense_reward
    from trl_uniapl.ifeval.task import make_splits
    from trl_uniapl.trainer import UniAPLTrainer

    student = build_student(show_progress=True)
    splits = make_splits(seed=seed)
    config = demo_config(
        os.path.join(output_dir, f"run-seed{seed}"),
        max_steps,
        seed,
        discriminator_warmup_steps=max_steps,  # λ = 0 throughout: the discriminator learns, the policy ignores it
        logging_steps=1,
    )
    trainer = UniAPLTrainer(
        model=student,
        reward_funcs=[ifeval_dense_reward],
        args=config,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
    )
    start = time.time()
    trainer.train()
    updates = [
        entry
        for entry in trainer.state.log_history
        if "discriminator/loss" in entry and "discriminator/acc_real" in entry
    ]
    steps = [entry["step"] for entry in updates]
    accuracies = [(entry["discriminator/acc_real"] + entry["discriminator/acc_fake"]) / 2 for entry in updates]
    return {
        "seed": seed,
        "steps": steps,
        "balanced_accuracy": accuracies,
        "js_estimate": [entry["discriminator/js_estimate"] for entry in updates],
        "discriminator_loss": [entry["discriminator/loss"] for entry in updates],
        "left_chance": left_chance(steps, accuracies),
        "train_seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="benchmarks/results/discriminator_warmup")
    parser.add_argument("--analyse", default=None, metavar="JSON", help="Recompute the analysis of a finished run.")
    args = parser.parse_args()
    if args.analyse:
        with open(args.analyse) as f:
            result = json.load(f)
        for run_result in result["runs"]:
            run_result.pop("warmup_step", None)
            run_result["left_chance"] = left_chance(run_result["steps"], run_result["balanced_accuracy"])
        result["left_chance"] = [run_result["left_chance"] for run_result in result["runs"]]
        result.pop("warmup_steps", None)
        with open(args.analyse, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result["left_chance"]))
        return
    quiet_libraries()
    os.makedirs(args.output_dir, exist_ok=True)
    runs = [run(seed, args.max_steps, args.output_dir) for seed in args.seeds]
    result = {
        "command": "python benchmarks/discriminator_warmup.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "runs": runs,
        "left_chance": [run_result["left_chance"] for run_result in runs],
    }
    with open(os.path.join(args.output_dir, "discriminator_warmup.json"), "w") as f:
        json.dump(result, f, indent=1)
    for run_result in runs:
        print(f"seed {run_result['seed']}: left chance at {run_result['left_chance']}")
        for step, accuracy in zip(run_result["steps"], run_result["balanced_accuracy"]):
            print(f"  step {step:4d}  balanced accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
