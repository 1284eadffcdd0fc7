"""A small learned, reference-conditioned scorer for the embedded task: a local stand-in for POLAR.

The UniAPL paper's discriminator is a fixed POLAR model (arXiv 2507.05197) that scores a candidate answer by its
consistency with the expert's reference answer to the same prompt. No such checkpoint is reachable offline, so
[`build_reference_scorer`] trains a tiny `Qwen3ForSequenceClassification` (one logit) once, on the embedded task of
[`trl_uniapl.ifeval.task`], with the student's tokenizer, and caches it like the student
([`trl_uniapl.demo.student.build_student`]). The folder loads with
[`~trl_uniapl.reference_scorers.SequenceClassifierScorer`] or `load_reference_scorer(str(path))`.

What it is trained on (a reconstruction; the paper's own data is not public). Each example is a triple
(prompt, reference, candidate) rendered with
[`~trl_uniapl.reference_scorers.DEFAULT_REFERENCE_TEMPLATE`]; the reference is always the teacher's answer
([`~trl_uniapl.ifeval.task.teacher_response`]) to the prompt. The teacher is deterministic (its answer depends only on
the topic, instructions and their arguments), so a second teacher sample for the same prompt does not exist; the
candidates are instead built from the task's own generators and **labelled by the task's verifier**, lm-eval's strict
IFEval checkers plus the topic check ([`~trl_uniapl.ifeval.rewards.check_response`]): a candidate is positive when it
follows every instruction of the prompt and stays on topic, negative otherwise. Candidates equal to the reference are
dropped (a copy would teach string matching, and every scorer ranks it first). The candidate kinds:

- `superset`: the teacher's answer to the same topic and instructions plus one more compatible instruction (its
  arguments drawn at random): an expert answer that still follows every instruction asked, with one unrequested
  extra part. Nearly always positive.
- `subset`: the teacher's answer to the same prompt with one of its instructions left out: an expert answer that
  misses one instruction (a hard negative, close to the reference in wording). Nearly always negative.
- `plain`: [`~trl_uniapl.ifeval.task.plain_response`], on topic and ignoring every instruction (what the warmed-up
  student writes). Usually negative.
- `same_topic`: teacher answers written for *other* prompts on the same topic (a few are tried): the first one that
  passes the prompt's checks is a positive, the first one that fails a negative.
- `other_topic`: the teacher's answer to a prompt on another topic. Negative (off topic).

Training uses the pairwise Bradley–Terry loss `−log σ(s(x, ref, pos) − s(x, ref, neg))` over every (positive,
negative) pair of a prompt, with AdamW, a linear warm-up and a cosine decay; all draws are seeded.

Held-out evaluation: prompts drawn with another seed, disjoint from the training prompts, on the training topics
(`heldout`), and prompts on the task's held-out topics (`heldout_unseen_topics`). Their candidates are built the same
way. The ranking accuracy is the share of (positive, negative) pairs of a prompt in which the positive scores
strictly higher (a tie counts as a miss), overall and by negative kind, for the learned scorer and for
[`~trl_uniapl.reference_scorers.ngram_f1_scorer`] on the same pairs. It is written to `metrics.json` beside the model
([`load_metrics`]). Caveat: the held-out candidates come from the same generators as the training ones, so the accuracy
measures generalisation to new prompts, not to a policy's own samples.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

from ..ifeval import task
from ..ifeval.rewards import check_response, prompt_text
from ..reference_scorers import DEFAULT_REFERENCE_TEMPLATE, SequenceClassifierScorer, message_text, ngram_f1_scorer
from .cache import is_complete, staged_build
from .student import build_student, default_cache_dir

REFERENCE_SCORER_VERSION = "v1"
SETTINGS_FILE = "trl_uniapl_reference_scorer.json"
METRICS_FILE = "metrics.json"
_NEEDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", METRICS_FILE)
CANDIDATE_KINDS: tuple[str, ...] = ("superset", "subset", "plain", "same_topic", "other_topic")
"""Where candidates come from (see the module docstring); the label comes from the checkers, not from the kind."""
NEGATIVE_KINDS: tuple[str, ...] = ("subset", "plain", "same_topic", "other_topic")
"""The kinds that are (nearly always) negatives: [`ranking_accuracy`] reports each of them."""

# Seeds of the prompt draws, offset from the build seed so that they never meet the student's or make_splits' draws.
_TRAIN_SEED_OFFSET = 50_000
_HELDOUT_SEED_OFFSET = 60_000
_UNSEEN_TOPICS_SEED_OFFSET = 70_000
_CANDIDATE_SEED_OFFSET = 80_000


@dataclass
class CandidateGroup:
    """The candidates of one prompt, against its reference.

    Attributes:
        prompt (`list[dict]`): the prompt, conversational (`[{"role": "user", "content": ...}]`).
        reference (`str`): the teacher's answer to it.
        positives (`list[tuple[str, str]]`): `(kind, text)` of candidates that follow every instruction and the topic.
        negatives (`list[tuple[str, str]]`): `(kind, text)` of candidates that fail at least one check.
    """

    prompt: list[dict[str, str]]
    reference: str
    positives: list[tuple[str, str]] = field(default_factory=list)
    negatives: list[tuple[str, str]] = field(default_factory=list)

    def pairs(self) -> list[tuple[int, int]]:
        """All (positive index, negative index) pairs."""
        return [(i, j) for i in range(len(self.positives)) for j in range(len(self.negatives))]


def _compatible_extras(instruction_ids: Sequence[str]) -> list[str]:
    chosen = set(instruction_ids)
    return [
        extra
        for extra in task.INSTRUCTION_IDS
        if extra not in chosen and not any(pair <= chosen | {extra} for pair in task.EXCLUSIVE_INSTRUCTIONS)
    ]


def candidate_groups(
    num_prompts: int,
    seed: int,
    topics: Sequence[task.Topic] = task.TRAIN_TOPICS,
    exclude_prompts: Sequence[str] = (),
    num_supersets: int = 2,
    num_same_topic_tries: int = 8,
    progress: bool = False,
    description: str = "Building scorer triples",
) -> list[CandidateGroup]:
    """Draw prompts and build their reference and labelled candidates (see the module docstring).

    Args:
        num_prompts (`int`): prompts to draw ([`~trl_uniapl.ifeval.task.generate_rows`] with `seed`); duplicates and
            prompts in `exclude_prompts` are dropped, so fewer groups may come back.
        seed (`int`): seed of the prompt draw; the candidates' draws use `seed + 80000`.
        topics (`Sequence[Topic]`, *optional*, defaults to the training topics): topics of the prompts.
        exclude_prompts (`Sequence[str]`, *optional*): prompt texts to leave out (e.g. the training prompts).
        num_supersets (`int`, *optional*, defaults to `2`): `superset` candidates per prompt.
        num_same_topic_tries (`int`, *optional*, defaults to `8`): other same-topic teacher answers tried per prompt.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar.
        description (`str`, *optional*): the bar's label.

    Returns:
        `list[CandidateGroup]`: the groups with at least one positive and one negative, in draw order.
    """
    rows, seen = [], set(exclude_prompts)
    for row in task.generate_rows(num_prompts, seed=seed, topics=topics):
        text = prompt_text(row["prompt"])
        if text not in seen:
            seen.add(text)
            rows.append(row)
    rng = random.Random(seed + _CANDIDATE_SEED_OFFSET)
    references = [task.teacher_response(row) for row in rows]
    by_topic: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_topic.setdefault(row["topic"], []).append(index)

    groups = []
    for index, row in enumerate(tqdm(rows, desc=description, disable=not progress)):
        topic = task.TOPICS_BY_NAME[row["topic"]]
        instruction_ids = list(row["instruction_id_list"])
        kwargs = [{key: value for key, value in arguments.items() if value is not None} for arguments in row["kwargs"]]
        reference = references[index]

        def follows(candidate: str, row: dict = row) -> bool:
            check = check_response(
                candidate, row["instruction_id_list"], row["kwargs"], row["topic_keywords"], prompt_text(row["prompt"])
            )
            return check.follow_all

        candidates: list[tuple[str, str]] = []
        extras = _compatible_extras(instruction_ids)
        for extra in rng.sample(extras, min(num_supersets, len(extras))):
            extra_kwargs = task._sample_kwargs(extra, topic, rng)  # the task's own argument sampler
            superset = task.make_row(topic, [*instruction_ids, extra], [*kwargs, extra_kwargs])
            candidates.append(("superset", task.teacher_response(superset)))
        left_out = rng.randrange(len(instruction_ids))
        subset = task.make_row(
            topic,
            instruction_ids[:left_out] + instruction_ids[left_out + 1 :],
            kwargs[:left_out] + kwargs[left_out + 1 :],
        )
        candidates.append(("subset", task.teacher_response(subset)))
        candidates.append(("plain", task.plain_response(row, seed=rng.randrange(2**31))))
        others = [other for other in range(len(rows)) if rows[other]["topic"] != row["topic"]]
        if others:
            candidates.append(("other_topic", references[rng.choice(others)]))

        group = CandidateGroup(prompt=list(row["prompt"]), reference=reference)
        used = {reference}
        for kind, candidate in candidates:
            if candidate in used:
                continue
            used.add(candidate)
            (group.positives if follows(candidate) else group.negatives).append((kind, candidate))
        same_topic = [other for other in by_topic[row["topic"]] if references[other] not in used]
        found_positive = found_negative = False
        for other in rng.sample(same_topic, min(num_same_topic_tries, len(same_topic))):
            candidate = references[other]
            if candidate in used:
                continue
            passes = follows(candidate)
            if passes and not found_positive:
                group.positives.append(("same_topic", candidate))
                found_positive = True
            elif not passes and not found_negative:
                group.negatives.append(("same_topic", candidate))
                found_negative = True
            used.add(candidate)
            if found_positive and found_negative:
                break
        if group.positives and group.negatives:
            groups.append(group)
    return groups


def ranking_accuracy(scorer: Any, groups: Sequence[CandidateGroup]) -> dict[str, Any]:
    """Ranking accuracy of a reference scorer on candidate groups.

    Every candidate of a group is scored as `scorer([prompt], [reference], [candidate])` (batched over all groups); a
    (positive, negative) pair of one prompt counts as correct when the positive scores strictly higher.

    Args:
        scorer: a reference scorer (`scorer(prompts, references, completions) -> list[float]`).
        groups (`Sequence[CandidateGroup]`): from [`candidate_groups`].

    Returns:
        `dict`: `ranking_accuracy` (share of correct pairs), `num_pairs`, `num_prompts`, `ties` (pairs with equal
        scores, counted as misses) and `by_negative_kind` (`{kind: {"ranking_accuracy", "num_pairs"}}`).
    """
    prompts, references, completions = [], [], []
    for group in groups:
        for _, text in (*group.positives, *group.negatives):
            prompts.append(group.prompt)
            references.append([{"role": "assistant", "content": group.reference}])
            completions.append([{"role": "assistant", "content": text}])
    scores = list(scorer(prompts, references, completions)) if prompts else []
    if len(scores) != len(prompts):
        raise ValueError(f"The scorer returned {len(scores)} scores for {len(prompts)} rows.")
    correct = total = ties = 0
    by_kind: dict[str, list[int]] = {kind: [0, 0] for kind in NEGATIVE_KINDS}
    offset = 0
    for group in groups:
        positive_scores = scores[offset : offset + len(group.positives)]
        offset += len(group.positives)
        negative_scores = scores[offset : offset + len(group.negatives)]
        offset += len(group.negatives)
        for i, j in group.pairs():
            hit = positive_scores[i] > negative_scores[j]
            ties += positive_scores[i] == negative_scores[j]
            correct += hit
            total += 1
            counts = by_kind.setdefault(group.negatives[j][0], [0, 0])
            counts[0] += hit
            counts[1] += 1
    return {
        "ranking_accuracy": correct / total if total else float("nan"),
        "num_pairs": total,
        "num_prompts": len(groups),
        "ties": ties,
        "by_negative_kind": {
            kind: {"ranking_accuracy": hits / count if count else None, "num_pairs": count}
            for kind, (hits, count) in by_kind.items()
        },
    }


def _render(group: CandidateGroup, candidate: str) -> str:
    return DEFAULT_REFERENCE_TEMPLATE.format(
        prompt=message_text(group.prompt), reference=group.reference, completion=candidate
    )


def _train_scorer(
    model: Qwen3ForSequenceClassification,
    tokenizer: Any,
    groups: Sequence[CandidateGroup],
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    progress: bool,
) -> dict[str, float]:
    """Bradley–Terry training on every (positive, negative) pair of `groups`; returns loss and pair statistics."""
    texts: list[str] = []
    index_of: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []

    def text_index(text: str) -> int:
        if text not in index_of:
            index_of[text] = len(texts)
            texts.append(text)
        return index_of[text]

    for group in groups:
        for i, j in group.pairs():
            pairs.append(
                (text_index(_render(group, group.positives[i][1])), text_index(_render(group, group.negatives[j][1])))
            )
    truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # as SequenceClassifierScorer truncates
    try:
        token_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = truncation_side

    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, num_steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, num_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    pad_id = tokenizer.pad_token_id
    order: list[int] = []
    recent: list[float] = []
    model.train()
    bar = tqdm(total=num_steps, desc="Training reference scorer", disable=not progress)
    for _step in range(num_steps):
        batch = []
        while len(batch) < min(batch_size, len(pairs)):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            batch.append(pairs[order.pop()])
        rows = sorted({index for pair in batch for index in pair})
        position = {index: k for k, index in enumerate(rows)}
        width = max(len(token_ids[index]) for index in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, index in enumerate(rows):  # right padding, as SequenceClassifierScorer pads
            ids = token_ids[index]
            input_ids[k, : len(ids)] = torch.tensor(ids)
            attention_mask[k, : len(ids)] = 1
        scores = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        positive = scores[torch.tensor([position[p] for p, _ in batch])]
        negative = scores[torch.tensor([position[n] for _, n in batch])]
        loss = -F.logsigmoid(positive - negative).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-49:], loss.item()]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return {
        "train_loss_last50": sum(recent) / len(recent) if recent else float("nan"),
        "num_train_pairs": len(pairs),
        "num_train_texts": len(texts),
        "num_train_prompts": len(groups),
    }


def _tokenizer_fingerprint(path: Path) -> str:
    files = [path / name for name in ("tokenizer.json", "tokenizer_config.json") if (path / name).is_file()]
    if not files:
        raise ValueError(f"{str(path)!r} has no tokenizer.json: give the student's directory (or a tokenizer's).")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _is_complete(path: Path, settings: dict[str, Any]) -> bool:
    return is_complete(path, SETTINGS_FILE, _NEEDED_FILES, settings)


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The held-out metrics [`build_reference_scorer`] wrote beside the model (`metrics.json`)."""
    return json.loads((Path(path) / METRICS_FILE).read_text())


def build_reference_scorer(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    student: str | os.PathLike | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_train_prompts: int = 600,
    num_heldout_prompts: int = 200,
    num_steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    max_length: int = 512,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or load from the cache) the embedded task's learned reference scorer and return its folder.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Root of the cache, shared with the student; defaults to
            [`~trl_uniapl.demo.student.default_cache_dir`] (`$TRL_UNIAPL_CACHE` or `~/.cache/trl_uniapl`). The scorer
            lives in `<cache_dir>/reference-scorer-v1` with the default settings and in
            `<cache_dir>/reference-scorer-v1-<hash>` otherwise.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the prompt and candidate draws, the weights and the training order.
        student (`str` or `os.PathLike`, *optional*):
            Directory whose tokenizer the scorer uses. By default the student's:
            [`~trl_uniapl.demo.student.build_student`] in the same cache (built first if missing, about 2 minutes
            on a 2-core CPU; its own seed, 0). The tokenizer's content is part of the settings record, so a changed
            tokenizer rebuilds the scorer.
        hidden_size (`int`, *optional*, defaults to `64`),
        num_hidden_layers (`int`, *optional*, defaults to `2`),
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Shape of the `Qwen3ForSequenceClassification` (random initialisation, intermediate size `2 * hidden_size`).
        num_train_prompts (`int`, *optional*, defaults to `600`),
        num_heldout_prompts (`int`, *optional*, defaults to `200`):
            Prompts drawn for training and for each held-out set (training topics; held-out topics).
        num_steps (`int`, *optional*, defaults to `200`),
        batch_size (`int`, *optional*, defaults to `16`),
        learning_rate (`float`, *optional*, defaults to `3e-3`):
            Training: steps of `batch_size` (positive, negative) pairs, AdamW, 10% linear warm-up, cosine decay.
        max_length (`int`, *optional*, defaults to `512`):
            Longest tokenized row (left truncation), in training and in the saved scorer's use.
        force (`bool`, *optional*, defaults to `False`):
            Rebuild even if a valid cached scorer exists.
        progress (`bool`, *optional*, defaults to `True`):
            Show tqdm bars (triples, training, and transformers' own while saving and loading).

    Returns:
        `pathlib.Path`: the folder with the model, its tokenizer, the settings record and `metrics.json` (see
        [`load_metrics`]); load it with `SequenceClassifierScorer(path)` or `load_reference_scorer(str(path))`.
    """
    arguments = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_train_prompts": num_train_prompts,
        "num_heldout_prompts": num_heldout_prompts,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "max_length": max_length,
    }
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})."
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    student_path = (
        Path(student) if student is not None else Path(build_student(cache_dir=root, show_progress=progress))
    )
    settings = {
        "reference_scorer_version": REFERENCE_SCORER_VERSION,
        "task_version": task.TASK_VERSION,
        "seed": seed,
        "template": DEFAULT_REFERENCE_TEMPLATE,
        "tokenizer": _tokenizer_fingerprint(student_path),
        **arguments,
    }
    is_default = student is None and seed == 0 and arguments == _default_arguments()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"reference-scorer-{REFERENCE_SCORER_VERSION}"
    path = root / (name if is_default else f"{name}-{digest}")
    if not force and _is_complete(path, settings):
        return path

    started = time.perf_counter()
    with staged_build(path, SETTINGS_FILE, _NEEDED_FILES, settings, progress) as staging:
        train_groups = candidate_groups(
            num_train_prompts, seed=_TRAIN_SEED_OFFSET + seed, progress=progress, description="Training triples"
        )
        train_prompts = [prompt_text(group.prompt) for group in train_groups]
        heldout_groups = candidate_groups(
            num_heldout_prompts,
            seed=_HELDOUT_SEED_OFFSET + seed,
            exclude_prompts=train_prompts,
            progress=progress,
            description="Held-out triples",
        )
        unseen_groups = candidate_groups(
            num_heldout_prompts,
            seed=_UNSEEN_TOPICS_SEED_OFFSET + seed,
            topics=task.HELDOUT_TOPICS,
            progress=progress,
            description="Held-out triples (unseen topics)",
        )
        data_seconds = time.perf_counter() - started

        tokenizer = AutoTokenizer.from_pretrained(student_path)
        # Saved before any call with truncation: such a call leaves its settings in the backend's tokenizer.json.
        tokenizer.save_pretrained(staging)
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads,
            head_dim=hidden_size // num_attention_heads,
            max_position_embeddings=max(max_length, 128),
            tie_word_embeddings=False,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        model = Qwen3ForSequenceClassification(config)
        train_started = time.perf_counter()
        training = _train_scorer(
            model,
            tokenizer,
            train_groups,
            num_steps=num_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            max_length=max_length,
            seed=seed,
            progress=progress,
        )
        train_seconds = time.perf_counter() - train_started
        model.save_pretrained(staging)

        scorer = SequenceClassifierScorer(str(staging), max_length=max_length, device="cpu", batch_size=64)
        metrics = {
            "heldout": {
                "learned": ranking_accuracy(scorer, heldout_groups),
                "ngram_f1": ranking_accuracy(ngram_f1_scorer, heldout_groups),
            },
            "heldout_unseen_topics": {
                "learned": ranking_accuracy(scorer, unseen_groups),
                "ngram_f1": ranking_accuracy(ngram_f1_scorer, unseen_groups),
            },
            "training": training,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {
                "triples": round(data_seconds, 1),
                "training": round(train_seconds, 1),
                "total": round(time.perf_counter() - started, 1),
            },
            "settings": settings,
        }
        metrics["heldout_ranking_accuracy"] = metrics["heldout"]["learned"]["ranking_accuracy"]
        metrics["heldout_ranking_accuracy_ngram_f1"] = metrics["heldout"]["ngram_f1"]["ranking_accuracy"]
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def _default_arguments() -> dict[str, Any]:
    parameters = inspect.signature(build_reference_scorer).parameters
    names = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_train_prompts",
        "num_heldout_prompts",
        "num_steps",
        "batch_size",
        "learning_rate",
        "max_length",
    )
    return {name: parameters[name].default for name in names}
