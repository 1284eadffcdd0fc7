"""The demo's figures: training curves and the paper's length and log-probability distributions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _log_series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> str:
    """Reward, SFT and discriminator curves from a trainer's `state.log_history`, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Task and total reward", "mean reward per completion", ["rewards/ifeval_dense_reward/mean", "reward"]),
        ("SFT loss on expert completions", "NLL per token (nats)", ["sft/loss"]),
        ("Discriminator accuracy", "accuracy", ["discriminator/acc_real", "discriminator/acc_fake"]),
        ("Adversarial reward and JS estimate", "value", ["adversarial/reward_mean", "discriminator/js_estimate"]),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (title, ylabel, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = _log_series(log_history, key)
            if steps:
                axis.plot(steps, values, marker=".", label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def plot_distributions(
    lengths: dict[str, Sequence[float]], logprobs: dict[str, Sequence[float]], path: str | os.PathLike
) -> str:
    """Histograms of response lengths and of mean token log-probabilities, saved at `path`.

    `logprobs` keys that start with `before:`/`after:` followed by the same text (e.g. `before: own responses`) are
    drawn in one panel per text, before against after, so that no panel overlays more than two histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def shared_bins(samples: dict[str, Sequence[float]]) -> np.ndarray:
        values = np.concatenate([np.asarray(v, dtype=float) for v in samples.values() if len(v)] or [np.zeros(1)])
        return np.histogram_bin_edges(values, bins=25)

    panels: dict[str, dict[str, Sequence[float]]] = {}
    for name, values in logprobs.items():
        when, _, what = name.partition(": ")
        panels.setdefault(what or name, {})[when if what else name] = values
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4), squeeze=False)
    axes = axes[0]
    bins = shared_bins(lengths)
    for name, values in lengths.items():
        axes[0].hist(values, bins=bins, alpha=0.5, label=name)
    axes[0].set_title("Response length")
    axes[0].set_xlabel("tokens")
    bins = shared_bins(logprobs)  # one scale for every log-prob panel, so they compare
    for axis, (what, series) in zip(axes[1:], panels.items()):
        for name, values in series.items():
            axis.hist(values, bins=bins, alpha=0.5, label=name)
        axis.set_title(f"Mean token log-prob of {what}")
        axis.set_xlabel("log-prob per token (nats)")
    for axis in axes:
        axis.set_ylabel("number of prompts")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)
