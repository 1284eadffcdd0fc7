"""One table across the regimes of the quality protocol, and the issue's target checked in each, from their reports.

Reads each regime folder's `quality.json` (written by `benchmarks/quality.py`; nothing is trained or recomputed) and
writes `summary.json` and `summary.md` beside the folders:

    python benchmarks/quality_summary.py --root benchmarks/results/quality_protocol --regimes default scarce sparse

Per regime: every method's test prompt-level strict accuracy, UniAPL − the best tuned baseline (paired, from the
report's own bootstrap), whether the target holds (that difference ≥ 3 points with its 95% interval above 0), which
method's outputs are closest to the expert's (length W1, expert log-prob, unrequested effects) and the
discriminator's own effect (UniAPL − UniAPL without discriminator, paired).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling quality modules
import quality_protocol as protocol  # noqa: E402

BASELINES = ("sft", "grpo", "sft_then_grpo", "luffy")  # the tuned baselines; the other methods are UniAPL variants
SELECTION_METRIC = protocol.SELECTION_METRIC
TARGET_POINTS = 0.03  # the paper's claim, as the issue states it: UniAPL ≥ best tuned baseline + 3 points
# For each distribution metric, whether a smaller value is closer to the expert.
# The discriminator's own effect (UniAPL − UniAPL without discriminator) in the table: metric -> label, scale, digits.
DISCRIMINATOR_ROWS = {
    "prompt_level_strict_acc": ("accuracy (points, paired)", 100, 1),
    "length_wasserstein_to_expert": ("length W1 (tokens, paired)", 1, 2),
    "expert_logp": ("expert log-prob (nats/token, paired)", 1, 3),
}
CLOSENESS = {"length_wasserstein_to_expert": True, "expert_logp": False, "unrequested_effect_rate_mean": True}


def negated(stat: dict[str, float]) -> dict[str, float]:
    """A paired difference b − a from a − b: the mean changes sign and the interval's ends swap."""
    return {"mean": -stat["mean"], "low": -stat["high"], "high": -stat["low"]}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The cross-regime row of one regime's `quality.json`."""
    reference = report["reference_method"]
    results = {method: entry for method, entry in report["results"].items() if "test" in entry}
    if reference not in results or not report.get("complete"):
        raise ValueError(
            f"The report of regime {report.get('regime')!r} is incomplete (its test runs are not all finished): "
            "rerun its `benchmarks/quality.py --regime` command, which resumes, before summarising it."
        )
    accuracy = {m: e["test"]["prompt_level_strict_acc"] for m, e in results.items()}
    baselines = [m for m in BASELINES if m in results]
    best = max(baselines, key=lambda m: accuracy[m]["mean"])
    uniapl_minus_best = negated(results[best]["minus_reference"]["prompt_level_strict_acc"])
    closest = {
        metric: (min if smaller else max)(results, key=lambda m: results[m]["test"][metric]["mean"])
        for metric, smaller in CLOSENESS.items()
    }
    out = {
        "accuracy": accuracy,
        "best_baseline": best,
        "uniapl_minus_best_baseline": uniapl_minus_best,
        "target_met": uniapl_minus_best["mean"] >= TARGET_POINTS and uniapl_minus_best["low"] > 0,
        "closest_to_expert": closest,
        # The settings' α is UniAPL's unless its grid point sets one (the `default` regime ran at α = 1).
        "uniapl_config": {"sft_coef": report["settings"]["sft_coef"], **results[reference].get("config", {})},
        "untrained_student": report.get("reference", {}).get("test", {}).get("student", {}).get(SELECTION_METRIC),
    }
    if "uniapl_no_disc" in results:
        out["discriminator_effect"] = {
            metric: negated(stat) for metric, stat in results["uniapl_no_disc"]["minus_reference"].items()
        }
    return out


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    regimes = list(summary)
    methods = [m for m in protocol.METHODS if any(m in row["accuracy"] for row in summary.values())]
    lines = [
        "# Quality protocol: all regimes (test prompt-level strict accuracy %, mean [95% CI])",
        "",
        "| method | " + " | ".join(f"`{r}`" for r in regimes) + " |",
        "|" + "---|" * (len(regimes) + 1),
    ]
    for method in methods:
        cells = [protocol.format_interval(summary[r]["accuracy"].get(method), 100, 1) for r in regimes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    rows = [
        ("best tuned baseline", lambda row: row["best_baseline"]),
        (
            "UniAPL − best baseline (points, paired)",
            lambda row: protocol.format_interval(row["uniapl_minus_best_baseline"], 100, 1),
        ),
        ("target (≥ +3, interval above 0) met", lambda row: "yes" if row["target_met"] else "**no**"),
        *(
            (f"closest to the expert: {metric}", lambda row, metric=metric: row["closest_to_expert"][metric])
            for metric in CLOSENESS
        ),
        *(
            (
                f"discriminator's effect on {label}",
                lambda row, key=key, scale=scale, digits=digits: protocol.format_interval(
                    row.get("discriminator_effect", {}).get(key), scale, digits
                ),
            )
            for key, (label, scale, digits) in DISCRIMINATOR_ROWS.items()
        ),
    ]
    lines += ["", "| | " + " | ".join(f"`{r}`" for r in regimes) + " |", "|" + "---|" * (len(regimes) + 1)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(summary[r]) for r in regimes) + " |")
    lines += ["", "Untrained student and UniAPL's configuration per regime (selected on validation):", ""]
    for regime in regimes:
        student = summary[regime]["untrained_student"]
        shown = "–" if student is None else f"{student * 100:.1f}%"
        lines.append(f"- `{regime}`: student {shown}; UniAPL {summary[regime]['uniapl_config']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="benchmarks/results/quality_protocol")
    parser.add_argument("--regimes", nargs="+", default=list(protocol.REGIMES))
    args = parser.parse_args(argv)
    summary = {}
    for regime in args.regimes:
        path = os.path.join(args.root, regime, "quality.json")
        if not os.path.exists(path):
            raise ValueError(f"No report at {path}: run `python benchmarks/quality.py --regime {regime}` first.")
        summary[regime] = summarise(protocol.read_json(path))
    protocol.write_json(os.path.join(args.root, "summary.json"), summary)
    text = markdown(summary)
    with open(os.path.join(args.root, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return summary


if __name__ == "__main__":
    main()
