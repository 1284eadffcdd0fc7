"""Paired differences between test runs of two regime folders (same seeds, settings and test prompts), e.g. a variant
of the λ sweep against the `default` regime's baselines, which its own report does not hold.

    python benchmarks/quality_compare.py \
        --reference benchmarks/results/quality_protocol/lambda_sweep-default uniapl_lambda0.3 \
        --against benchmarks/results/quality_protocol/default grpo sft_then_grpo luffy \
        --output benchmarks/results/quality_protocol/lambda_sweep-default/paired_against_default.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling quality modules
import quality_protocol as protocol  # noqa: E402
from quality_stats import bootstrap  # noqa: E402


def test_runs(root: str, method: str) -> dict[int, dict[str, Any]]:
    folder = os.path.dirname(protocol.RunStore(root).test_path(method, 0))
    runs = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("seed") and name.endswith(".json"):
            record = protocol.read_json(os.path.join(folder, name))
            runs[record["seed"]] = record
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", nargs=2, metavar=("FOLDER", "METHOD"), required=True)
    parser.add_argument("--against", nargs="+", metavar="FOLDER_THEN_METHODS", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    reference_root, reference_method = args.reference
    against_root, methods = args.against[0], args.against[1:]
    for root in (reference_root, against_root):  # paired only when the runs share settings, hence splits and seeds
        if not os.path.exists(os.path.join(root, "settings.json")):
            raise ValueError(f"{root} holds no settings.json: not a regime folder of benchmarks/quality.py.")
    if protocol.read_json(os.path.join(reference_root, "settings.json")) != protocol.read_json(
        os.path.join(against_root, "settings.json")
    ):
        raise ValueError(f"{reference_root} and {against_root} ran with other settings: their runs do not pair.")
    # Runs on two different students still pair by seed and prompt, but a difference then also holds the students'
    # own: said in the output (and on screen), not refused.
    students = {root: protocol.RunStore(root).recorded_student() for root in (reference_root, against_root)}
    if len(set(students.values())) > 1:
        print(f"note: the two folders' runs were made on different students: {students}")
    reference = test_runs(reference_root, reference_method)
    out = {"reference": {"folder": reference_root, "method": reference_method}, "minus_reference": {},
           "students": students}  # fmt: skip
    for method in methods:
        runs = test_runs(against_root, method)
        seeds = sorted(set(runs) & set(reference))
        differences = bootstrap(
            [runs[s]["per_prompt"] for s in seeds],
            baseline=[reference[s]["per_prompt"] for s in seeds],
            num_samples=args.num_bootstrap,
        )
        out["minus_reference"][method] = {"folder": against_root, "seeds": seeds, **differences}
        strict = differences["prompt_level_strict_acc"]
        print(
            f"{method} - {reference_method}: prompt strict {strict['mean'] * 100:+.1f} "
            f"[{strict['low'] * 100:.1f}, {strict['high'] * 100:.1f}] points (seeds {seeds})"
        )
    protocol.write_json(args.output, out)
    return out


if __name__ == "__main__":
    main()
