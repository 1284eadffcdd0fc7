"""Per-prompt records of one evaluated run and the bootstrap over seeds and prompts that the quality report uses.

A run's metrics are recomputed here from per-prompt arrays (which prompt passed, how many of its instructions passed,
which unrequested effects appeared, lengths, expert log-probs) so that a bootstrap replicate can resample prompts and
recompute every metric with the same definition as `trl_uniapl.ifeval.evaluation.evaluate_ifeval`: ratio metrics
(instruction-level accuracy, unrequested-effect rates) as ratios of resampled sums, and length W1 as the distance
between the resampled policy and expert lengths (a distance is not a mean over prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trl_uniapl.ifeval.evaluation import DEFAULT_EFFECT_PROBES, _effect_appears, length_wasserstein
from trl_uniapl.ifeval.rewards import check_response, prompt_text

# The metrics of the issue, each as (name in the report, function of per-prompt arrays restricted to an index sample).
REPORT_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "topic_accuracy",
    "unrequested_effect_rate_mean",
    "length_wasserstein_to_expert",
    "expert_logp",
)


def distinct_ngrams(responses: Sequence[str], n: int = 2) -> float | None:
    """Distinct-n (Li et al., 2016) of a set of responses: distinct word n-grams over all word n-grams, pooled over
    the responses. 1.0 when no n-gram repeats; it falls as a policy collapses onto the same phrasing whatever the
    prompt (the diversity question about high λ). None when no response has n words."""
    ngrams = [tuple(words[i : i + n]) for words in (r.split() for r in responses) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else None


def per_prompt_records(
    eval_rows: Sequence[Mapping[str, Any]], responses: Sequence[str], response_lengths, expert_lengths, expert_logp
) -> dict[str, list]:
    """Per-prompt arrays of one evaluation, scored with the project's own checker (`check_response`).

    `effects[i][k]` is 1 when the effect of `DEFAULT_EFFECT_PROBES`' k-th instruction appears in response i although
    row i did not ask for it, 0 when it does not appear, -1 when row i asked for it (not counted, as in
    `evaluate_ifeval`).
    """
    probes = list(DEFAULT_EFFECT_PROBES)
    records: dict[str, list] = {
        "prompt_strict": [],
        "inst_followed": [],
        "inst_total": [],
        "on_topic": [],
        "effects": [],
    }
    for index, (row, response) in enumerate(zip(eval_rows, responses)):
        check = check_response(
            response,
            instruction_id_list=row["instruction_id_list"],
            kwargs=row["kwargs"],
            topic_keywords=row.get("topic_keywords"),
            prompt=prompt_text(row["prompt"]),
            row_index=index,
        )
        records["prompt_strict"].append(int(all(check.results)))
        records["inst_followed"].append(int(sum(check.results)))
        records["inst_total"].append(len(check.results))
        records["on_topic"].append(None if check.on_topic is None else int(check.on_topic))
        records["effects"].append(
            [
                -1
                if instruction_id in row["instruction_id_list"]
                else int(_effect_appears(instruction_id, DEFAULT_EFFECT_PROBES[instruction_id], response))
                for instruction_id in probes
            ]
        )
    records["response_length"] = [int(x) for x in response_lengths]
    records["expert_length"] = [int(x) for x in expert_lengths]
    records["expert_logp"] = [float(x) for x in expert_logp]
    return records


def _as_arrays(records: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    arrays = {key: np.asarray(value, dtype=np.float64) for key, value in records.items() if key != "on_topic"}
    arrays["on_topic"] = np.asarray([np.nan if v is None else v for v in records["on_topic"]], dtype=np.float64)
    return arrays


def metric_values(arrays: Mapping[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of `REPORT_METRICS` on the prompts `index` (all prompts when `None`; repeats count twice)."""
    a = arrays if index is None else {key: value[index] for key, value in arrays.items()}
    effects = a["effects"]
    applicable = (effects >= 0).sum(axis=0)
    appeared = (effects == 1).sum(axis=0)
    rates = appeared[applicable > 0] / applicable[applicable > 0]
    topic = a["on_topic"][~np.isnan(a["on_topic"])]
    return {
        "prompt_level_strict_acc": float(a["prompt_strict"].mean()),
        "inst_level_strict_acc": float(a["inst_followed"].sum() / max(a["inst_total"].sum(), 1.0)),
        "topic_accuracy": float(topic.mean()) if topic.size else float("nan"),
        "unrequested_effect_rate_mean": float(rates.mean()) if rates.size else float("nan"),
        "length_wasserstein_to_expert": float(length_wasserstein(a["response_length"], a["expert_length"])),
        "expert_logp": float(a["expert_logp"].mean()),
    }


def bootstrap(
    runs: Sequence[Mapping[str, Sequence]],
    baseline: Sequence[Mapping[str, Sequence]] | None = None,
    num_samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    statistic: Callable[[Mapping[str, np.ndarray], np.ndarray | None], dict[str, float]] = metric_values,
) -> dict[str, dict[str, float]]:
    """Mean over seeds of each metric with a percentile bootstrap confidence interval over seeds AND prompts.

    Each replicate draws the seeds with replacement and, independently, the prompts with replacement (the same prompt
    draw for every seed: all runs are scored on the same prompts), and averages the drawn seeds' metrics on the drawn
    prompts. So the interval covers both sources of noise: another training seed and another test sample.

    With `baseline` (one per-prompt record per seed, aligned with `runs`: same seeds, same prompts), the statistic is
    the paired difference `run - baseline`, both computed on the same drawn seeds and prompts in every replicate.

    Returns:
        `{metric: {"mean", "low", "high", "n_seeds", "n_prompts"}}`.
    """
    if not runs:
        return {}
    arrays = [_as_arrays(run) for run in runs]
    base = None if baseline is None else [_as_arrays(run) for run in baseline]
    if base is not None and len(base) != len(arrays):
        raise ValueError(f"Paired bootstrap needs one baseline run per run, got {len(base)} and {len(arrays)}.")
    num_prompts = len(arrays[0]["prompt_strict"])
    if any(len(a["prompt_strict"]) != num_prompts for a in arrays + (base or [])):
        raise ValueError("Every run must be scored on the same prompts.")

    def value(seeds: np.ndarray, prompts: np.ndarray | None) -> dict[str, float]:
        per_seed = []
        for s in seeds:
            values = statistic(arrays[s], prompts)
            if base is not None:
                reference = statistic(base[s], prompts)
                values = {key: values[key] - reference[key] for key in values}
            per_seed.append(values)
        return {key: float(np.mean([v[key] for v in per_seed])) for key in per_seed[0]}

    num_seeds = len(arrays)
    point = value(np.arange(num_seeds), None)
    rng = np.random.default_rng(seed)
    replicates = [
        value(rng.integers(0, num_seeds, num_seeds), rng.integers(0, num_prompts, num_prompts))
        for _ in range(num_samples)
    ]
    tail = (1.0 - level) / 2 * 100
    out = {}
    for key, mean in point.items():
        samples = np.asarray([r[key] for r in replicates])
        samples = samples[~np.isnan(samples)]
        low, high = np.percentile(samples, [tail, 100 - tail]) if samples.size else (float("nan"),) * 2
        out[key] = {
            "mean": mean,
            "low": float(low),
            "high": float(high),
            "n_seeds": num_seeds,
            "n_prompts": num_prompts,
        }
    return out
