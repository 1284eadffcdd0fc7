"""Evaluation tools: IFEval metrics by greedy generation, expert log-probabilities and length distances.

These are the analyses the UniAPL abstract (arXiv 2509.25148) reports, rebuilt for this project:

- [`evaluate_ifeval`]: IFEval's four metrics (prompt- and instruction-level, strict and loose) computed with lm-eval's
  checkers through [`rewards.check_response`], plus how often each instruction's effect appears when the
  prompt did *not* ask for it, topic accuracy and response lengths;
- [`expert_logprob`]: mean per-token log-probability of expert completions under a model;
- [`length_wasserstein`]: the 1-D Wasserstein-1 distance between two length samples (policy against expert).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .rewards import check_response, completion_text, instructions_registry, prompt_text
from .task import END_PHRASES

DEFAULT_EFFECT_PROBES: dict[str, tuple[dict[str, Any], ...]] = {
    "change_case:english_lowercase": ({},),
    "change_case:english_capital": ({},),
    "punctuation:no_comma": ({},),
    "startend:quotation": ({},),
    "detectable_format:title": ({},),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, {"postscript_marker": "P.P.S"}),
    "startend:end_checker": tuple({"end_phrase": phrase} for phrase in END_PHRASES),
    "detectable_format:number_bullet_lists": tuple({"num_bullets": n} for n in range(1, 11)),
}
"""How [`evaluate_ifeval`] decides that an instruction's effect appears in a response: the effect appears when the
instruction's lm-eval checker, built with *any* of these row-independent kwargs, accepts the (non-empty) response.
Instructions whose effect depends on the row (keywords, forbidden words, word counts) are not probed."""


def _prompt_messages(prompt: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def _render_prompts(tokenizer, prompts: Sequence) -> list[str]:
    if tokenizer.chat_template is None:
        return [prompt if isinstance(prompt, str) else prompt_text(prompt) for prompt in prompts]
    return [
        tokenizer.apply_chat_template(_prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]


def _batches(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    show_progress: bool = True,
    **generation_kwargs: Any,
) -> tuple[list[str], list[int]]:
    """Greedy responses to `prompts` (strings or conversational), batched with left padding.

    Returns:
        `tuple[list[str], list[int]]`: decoded responses (special tokens skipped) and their lengths in tokens (up to,
        not counting, the first end-of-sequence token).
    """
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = _model_device(model)
    eos_ids = set(_as_list(model.generation_config.eos_token_id or tokenizer.eos_token_id))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses: list[str] = []
    lengths: list[int] = []
    try:
        texts = _render_prompts(tokenizer, prompts)
        batches = list(_batches(texts, batch_size))
        for batch in tqdm(batches, desc="Generating", disable=not show_progress):
            inputs = tokenizer(list(batch), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = {
                "do_sample": False,
                "max_new_tokens": max_new_tokens,
                "pad_token_id": pad_id,
                **generation_kwargs,
            }
            output = model.generate(**inputs, **kwargs)
            for ids in output[:, inputs["input_ids"].shape[1] :].tolist():
                end = next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))
                lengths.append(end)
                responses.append(tokenizer.decode(ids[:end], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return responses, lengths


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _effect_appears(instruction_id: str, probes: Sequence[dict[str, Any]], response: str) -> bool:
    if not response.strip():
        return False
    for kwargs in probes:
        checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        checker.build_description(**kwargs)
        if checker.check_following(response):
            return True
    return False


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _ifeval_metrics(strict: Sequence[Sequence[bool]], loose: Sequence[Sequence[bool]]) -> dict[str, float | None]:
    return {
        "prompt_level_strict_acc": _mean([all(row) for row in strict]),
        "inst_level_strict_acc": _mean([result for row in strict for result in row]),
        "prompt_level_loose_acc": _mean([all(row) for row in loose]),
        "inst_level_loose_acc": _mean([result for row in loose for result in row]),
    }


def evaluate_ifeval(
    model,
    tokenizer,
    dataset,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    effect_probes: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    show_progress: bool = True,
    **generation_kwargs: Any,
) -> dict[str, Any]:
    """Generate greedy responses to an IFEval-format dataset and score them with lm-eval's checkers.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            Causal language model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer; prompts are rendered with its chat template (`add_generation_prompt=True`) when it has one.
        dataset ([`~datasets.Dataset`] or sequence of dicts):
            Rows with `prompt` (string or conversational), `instruction_id_list` and `kwargs`; optional
            `topic_keywords` (topic check, see [`rewards`]), `expert_completion` (expert lengths), and
            boolean `unseen_topic` / `unseen_combination` (accuracy per group).
        max_new_tokens (`int`, *optional*, defaults to `96`):
            Generation budget per response.
        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per generation batch.
        effect_probes (`Mapping[str, Sequence[dict]]`, *optional*):
            Probes of unrequested effects, defaults to [`DEFAULT_EFFECT_PROBES`].
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.
        **generation_kwargs:
            Passed to `model.generate` (greedy unless overridden).

    Returns:
        `dict[str, Any]` with:

        - `prompt_level_strict_acc`, `inst_level_strict_acc`, `prompt_level_loose_acc`, `inst_level_loose_acc`:
          IFEval's metrics, where a row's topic check (if any) counts as one more instruction;
        - `ifeval_only`: the same four metrics ignoring the topic check (plain IFEval);
        - `topic_accuracy`: share of rows with topic keywords whose response is on topic (`None` without topics);
        - `inst_strict_acc_by_instruction`: strict accuracy of each instruction id over the rows that ask for it;
        - `unrequested_effect_rate`: per probed instruction id, the share of rows *not* asking for it whose response
          shows its effect (`None` if every row asks for it); `unrequested_effect_rate_mean`: their mean;
        - `mean_response_tokens`, `response_lengths`, `responses`, `prompt_level_strict` (per row);
        - with `expert_completion`: `expert_response_lengths` (tokens), `mean_expert_tokens` and
          `length_wasserstein_to_expert`;
        - with `unseen_topic` / `unseen_combination`: `prompt_level_strict_acc_by_group`, e.g.
          `{"unseen_topic": {"True": 0.1, "False": 0.4}}`.
    """
    rows = [dict(row) for row in dataset]
    probes = DEFAULT_EFFECT_PROBES if effect_probes is None else effect_probes
    responses, lengths = generate_responses(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
        **generation_kwargs,
    )
    strict, loose, strict_plain, loose_plain, topics = [], [], [], [], []
    effect_counts = {instruction_id: [0, 0] for instruction_id in probes}
    by_instruction: dict[str, list[bool]] = {}
    for index, (row, response) in enumerate(zip(rows, responses)):
        arguments = {
            "instruction_id_list": row["instruction_id_list"],
            "kwargs": row["kwargs"],
            "topic_keywords": row.get("topic_keywords"),
            "prompt": prompt_text(row["prompt"]),
            "row_index": index,
        }
        strict_check = check_response(response, **arguments)
        loose_check = check_response(response, loose=True, **arguments)
        strict.append(strict_check.results)
        loose.append(loose_check.results)
        strict_plain.append(strict_check.follow_instruction_list)
        loose_plain.append(loose_check.follow_instruction_list)
        if strict_check.on_topic is not None:
            topics.append(strict_check.on_topic)
        for instruction_id, followed in zip(row["instruction_id_list"], strict_check.follow_instruction_list):
            by_instruction.setdefault(instruction_id, []).append(followed)
        for instruction_id, counts in effect_counts.items():
            if instruction_id not in row["instruction_id_list"]:
                counts[0] += _effect_appears(instruction_id, probes[instruction_id], response)
                counts[1] += 1
    unrequested = {
        instruction_id: (appeared / total if total else None)
        for instruction_id, (appeared, total) in effect_counts.items()
    }
    results: dict[str, Any] = {
        **_ifeval_metrics(strict, loose),
        "ifeval_only": _ifeval_metrics(strict_plain, loose_plain),
        "topic_accuracy": _mean(topics),
        "inst_strict_acc_by_instruction": {key: _mean(value) for key, value in sorted(by_instruction.items())},
        "unrequested_effect_rate": unrequested,
        "unrequested_effect_rate_mean": _mean([rate for rate in unrequested.values() if rate is not None]),
        "mean_response_tokens": _mean(lengths),
        "response_lengths": lengths,
        "responses": responses,
        "prompt_level_strict": [all(row) for row in strict],
    }
    if rows and "expert_completion" in rows[0]:
        expert_lengths = [
            len(tokenizer(completion_text(row["expert_completion"]), add_special_tokens=False)["input_ids"])
            for row in rows
        ]
        results["expert_response_lengths"] = expert_lengths
        results["mean_expert_tokens"] = _mean(expert_lengths)
        results["length_wasserstein_to_expert"] = length_wasserstein(lengths, expert_lengths)
    groups = {}
    for column in ("unseen_topic", "unseen_combination"):
        if rows and column in rows[0]:
            groups[column] = {
                str(flag): _mean(
                    [ok for row, ok in zip(rows, results["prompt_level_strict"]) if bool(row[column]) == flag]
                )
                for flag in (True, False)
            }
    if groups:
        results["prompt_level_strict_acc_by_group"] = groups
    return results


@torch.no_grad()
def expert_logprob(
    model,
    tokenizer,
    prompts: Sequence,
    completions: Sequence,
    batch_size: int = 16,
    add_eos: bool = True,
) -> list[float]:
    """Mean per-token log-probability of each completion given its prompt, completion tokens only.

    The prompt is rendered with the tokenizer's chat template and `add_generation_prompt=True` (as the policy sees it
    in generation); the completion text is tokenized on its own and followed by the end-of-sequence token when
    `add_eos` (what a chat model must produce to stop). Batched with left padding and explicit position ids.

    Args:
        model ([`~transformers.PreTrainedModel`]): Causal language model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Its tokenizer.
        prompts (`Sequence`): Prompts, strings or conversational.
        completions (`Sequence`): Completions, strings or conversational (`[{"role": "assistant", ...}]`).
        batch_size (`int`, *optional*, defaults to `16`): Rows per forward pass.
        add_eos (`bool`, *optional*, defaults to `True`): Score the end-of-sequence token after the completion.

    Returns:
        `list[float]`: one mean log-probability (nats per token) per completion.
    """
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for batch in _completion_batches(tokenizer, prompts, completions, batch_size, add_eos, _model_device(model)):
            logits = model(**batch["inputs"]).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            token_logprobs = logprobs.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
            mask = batch["mask"]
            sums = (token_logprobs * mask).sum(-1)
            counts = mask.sum(-1).clamp(min=1)
            scores.extend((sums / counts).tolist())
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def kl_to_reference(
    model,
    reference_model,
    tokenizer,
    prompts: Sequence,
    completions: Sequence,
    batch_size: int = 16,
    add_eos: bool = True,
) -> float:
    """Mean per-token KL(π_model ‖ π_reference) of the next-token distributions along the given completions.

    At every completion token's position (prompt rendered as in [`expert_logprob`]) both models' full next-token
    distributions are compared exactly; the result is the mean over all those positions. With the policy's own
    responses as `completions`, it measures how far training moved the policy where the policy actually goes (e.g. the
    KL to the starting policy, which GRPO at β = 0 never logs).

    Args:
        model ([`~transformers.PreTrainedModel`]): The trained causal language model.
        reference_model ([`~transformers.PreTrainedModel`]): The model to compare against (same tokenizer).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Their tokenizer.
        prompts (`Sequence`): Prompts, strings or conversational.
        completions (`Sequence`): Completions, strings or conversational.
        batch_size (`int`, *optional*, defaults to `16`): Rows per forward pass.
        add_eos (`bool`, *optional*, defaults to `True`): Include the position of the end-of-sequence token.

    Returns:
        `float`: nats per token.
    """
    total, count = 0.0, 0
    modes = (model.training, reference_model.training)
    model.eval()
    reference_model.eval()
    try:
        for batch in _completion_batches(tokenizer, prompts, completions, batch_size, add_eos, _model_device(model)):
            logprobs = torch.log_softmax(model(**batch["inputs"]).logits.float()[:, :-1], dim=-1)
            reference_inputs = {k: v.to(_model_device(reference_model)) for k, v in batch["inputs"].items()}
            reference_logits = reference_model(**reference_inputs).logits.float()[:, :-1].to(logprobs.device)
            reference_logprobs = torch.log_softmax(reference_logits, dim=-1)
            token_kl = (logprobs.exp() * (logprobs - reference_logprobs)).sum(-1)
            total += (token_kl * batch["mask"]).sum().item()
            count += int(batch["mask"].sum())
    finally:
        model.train(modes[0])
        reference_model.train(modes[1])
    return total / max(count, 1)


def _completion_batches(tokenizer, prompts: Sequence, completions: Sequence, batch_size: int, add_eos: bool, device):
    """Left-padded (prompt + completion) batches: the model inputs (with explicit position ids), the next-token
    targets and the mask of the positions that predict a completion token."""
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = tokenizer(_render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([completion_text(c) for c in completions], add_special_tokens=False)["input_ids"]
    if add_eos:
        completion_ids = [ids + [tokenizer.eos_token_id] for ids in completion_ids]
    for start in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]))
        width = max(len(p) + len(c) for p, c in pairs)
        input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        completion_mask = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (p, c) in enumerate(pairs):
            sequence = p + c
            input_ids[i, width - len(sequence) :] = torch.tensor(sequence)
            attention_mask[i, width - len(sequence) :] = 1
            completion_mask[i, width - len(c) :] = True
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        yield {
            "inputs": {
                "input_ids": input_ids.to(device),
                "attention_mask": attention_mask.to(device),
                "position_ids": position_ids.to(device),
            },
            "targets": input_ids[:, 1:].to(device),
            "mask": completion_mask[:, 1:].to(device),
        }


def length_wasserstein(a: Sequence[float], b: Sequence[float]) -> float:
    """1-D Wasserstein-1 (earth mover's) distance between the empirical distributions of samples `a` and `b`.

    Computed as the integral of `|F_a(x) - F_b(x)|` over `x`, the same quantity as `scipy.stats.wasserstein_distance`
    without weights (scipy is not needed).

    Args:
        a (`Sequence[float]`): First sample (e.g. policy response lengths), non-empty.
        b (`Sequence[float]`): Second sample (e.g. expert response lengths), non-empty.

    Returns:
        `float`: the distance, in the samples' unit.
    """
    a_sorted = np.sort(np.asarray(a, dtype=np.float64))
    b_sorted = np.sort(np.asarray(b, dtype=np.float64))
    if a_sorted.size == 0 or b_sorted.size == 0:
        raise ValueError("length_wasserstein needs two non-empty samples.")
    values = np.sort(np.concatenate([a_sorted, b_sorted]))
    deltas = np.diff(values)
    cdf_a = np.searchsorted(a_sorted, values[:-1], side="right") / a_sorted.size
    cdf_b = np.searchsorted(b_sorted, values[:-1], side="right") / b_sorted.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * deltas))
