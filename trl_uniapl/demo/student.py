"""Build the small student model of the embedded task, warmed up on topic text, and cache it on disk.

The student is a Qwen3 causal LM of about one to two million parameters with a 2,000-token byte-level BPE vocabulary,
both created by [`trl_uniapl.demo.tiny.build_tiny_model`] from the task's own text (training topics only). It is then
warmed up briefly on prompts of [`~trl_uniapl.ifeval.task`] answered by [`~trl_uniapl.ifeval.task.plain_response`]
: on-topic text that
ignores the instructions. After the warm-up the student writes about the training topics but does not follow
instructions yet, which is the starting point for SFT, GRPO and UniAPL.

[`build_student`] caches the result under `$TRL_UNIAPL_CACHE` (default `~/.cache/trl_uniapl`) and rebuilds it when the
directory, a model file or its settings record is missing, or when the settings differ.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..ifeval import task
from ..ifeval.rewards import prompt_text
from .cache import is_complete, staged_build
from .tiny import build_tiny_model

STUDENT_VERSION = "v1"
SETTINGS_FILE = "trl_uniapl_student.json"
_NEEDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_FAST_SETTINGS = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 400,
    "num_corpus_rows": 200,
    "num_warmup_examples": 64,
    "num_epochs": 1,
    "batch_size": 16,
}


def default_cache_dir() -> Path:
    """Root of the student cache: `$TRL_UNIAPL_CACHE` if set, else `~/.cache/trl_uniapl`."""
    return Path(os.environ.get("TRL_UNIAPL_CACHE") or Path.home() / ".cache" / "trl_uniapl").expanduser()


def task_corpus(num_rows: int = 2000, seed: int = 0) -> list[str]:
    """Chat-formatted text of the task (training topics only) to train the student's tokenizer on.

    Each of `num_rows` sampled rows contributes its prompt with the teacher's answer and with a plain answer.
    """
    texts = []
    for row in task.generate_rows(num_rows, seed=seed, topics=task.TRAIN_TOPICS):
        prompt = prompt_text(row["prompt"])
        for answer in (task.teacher_response(row), task.plain_response(row)):
            texts.append(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
    return texts


def _settings(seed: int, **overrides: Any) -> dict[str, Any]:
    return {"student_version": STUDENT_VERSION, "task_version": task.TASK_VERSION, "seed": seed, **overrides}


def _is_complete(path: Path, settings: dict[str, Any]) -> bool:
    return is_complete(path, SETTINGS_FILE, _NEEDED_FILES, settings)


def _restyle(text: str, rng: random.Random, rate: float) -> str:
    """Change the surface form of `text` at random, independently of the prompt (the student should know what
    lowercase, capitals, quotes and comma-free text look like before it learns when to write them)."""
    if rng.random() < rate:
        text = text.replace(", ", " ").replace(",", "")
    case = rng.random()
    if case < rate:
        text = text.lower()
    elif case < 2 * rate:
        text = text.upper()
    if rng.random() < rate:
        text = f'"{text}"'
    return text


def _warmup_examples(tokenizer, num_examples: int, seed: int, style_rate: float) -> list[tuple[list[int], list[int]]]:
    rows = task.generate_rows(num_examples, seed=10_000 + seed, topics=task.TRAIN_TOPICS)
    rng = random.Random(seed)
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows
    ]
    answers = [_restyle(task.plain_response(row, seed=rng.randrange(2**31)), rng, style_rate) for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompt_ids, answer_ids)]


def _warm_up(
    model,
    tokenizer,
    examples: list[tuple[list[int], list[int]]],
    num_epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    show_progress: bool,
) -> None:
    """Plain torch loop: next-token loss on answer tokens, AdamW, linear warm-up then cosine decay."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    total_steps = num_epochs * math.ceil(len(examples) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, total_steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    pad_id = tokenizer.pad_token_id
    model.train()
    progress = tqdm(total=total_steps, desc="Warming up student", disable=not show_progress)
    for _epoch in range(num_epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(p) + len(a) for p, a in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (p, a) in enumerate(batch):
                input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
                attention_mask[i, : len(p) + len(a)] = 1
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()


def build_student(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    hidden_size: int = 192,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    vocab_size: int = 2000,
    num_corpus_rows: int = 2000,
    num_warmup_examples: int = 4000,
    num_epochs: int = 2,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    style_rate: float = 0.1,
    fast: bool = False,
    force: bool = False,
    show_progress: bool = True,
) -> str:
    """Build (or load from the cache) the task's student model and return its directory.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Root of the cache; defaults to [`default_cache_dir`] (`$TRL_UNIAPL_CACHE` or `~/.cache/trl_uniapl`). The
            student lives in `<cache_dir>/student-v1` with the default settings and in `<cache_dir>/student-v1-<hash>`
            otherwise.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the tokenizer corpus, the weights and the warm-up.
        hidden_size (`int`, *optional*, defaults to `192`),
        num_hidden_layers (`int`, *optional*, defaults to `3`),
        num_attention_heads (`int`, *optional*, defaults to `4`),
        vocab_size (`int`, *optional*, defaults to `2000`):
            Shape of the Qwen3 model and of its BPE vocabulary (passed to [`trl_uniapl.demo.tiny.build_tiny_model`]).
        num_corpus_rows (`int`, *optional*, defaults to `2000`):
            Rows of [`task_corpus`] the tokenizer is trained on.
        num_warmup_examples (`int`, *optional*, defaults to `4000`):
            Prompts answered with [`trl_uniapl.ifeval.task.plain_response`] for the warm-up.
        num_epochs (`int`, *optional*, defaults to `2`),
        batch_size (`int`, *optional*, defaults to `32`),
        learning_rate (`float`, *optional*, defaults to `3e-3`):
            Warm-up schedule (AdamW, 10% linear warm-up, cosine decay).
        style_rate (`float`, *optional*, defaults to `0.1`):
            Probability of each random, prompt-independent change of a warm-up answer's surface form (commas removed,
            lowercase, capitals, quotes): the student sees these forms without learning when to use them.
        fast (`bool`, *optional*, defaults to `False`):
            Build a much smaller student in seconds (for tests); overrides the size and warm-up arguments.
        force (`bool`, *optional*, defaults to `False`):
            Rebuild even if a valid cached student exists.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar during the warm-up (and transformers' own bars while saving and loading).

    Returns:
        `str`: the directory of the saved model and tokenizer, ready for `from_pretrained` or a trainer's `model=`.
    """
    arguments = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "vocab_size": vocab_size,
        "num_corpus_rows": num_corpus_rows,
        "num_warmup_examples": num_warmup_examples,
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "style_rate": style_rate,
    }
    if fast:
        arguments.update(_FAST_SETTINGS)
    settings = _settings(seed, **arguments)
    is_default = settings == _settings(0, **_default_arguments())
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / (f"student-{STUDENT_VERSION}" if is_default else f"student-{STUDENT_VERSION}-{digest}")
    if not force and _is_complete(path, settings):
        return str(path)

    with staged_build(path, SETTINGS_FILE, _NEEDED_FILES, settings, show_progress) as staging:
        corpus = task_corpus(arguments["num_corpus_rows"], seed=seed)
        build_tiny_model(
            staging,
            corpus,
            vocab_size=arguments["vocab_size"],
            hidden_size=arguments["hidden_size"],
            num_hidden_layers=arguments["num_hidden_layers"],
            num_attention_heads=arguments["num_attention_heads"],
            seed=seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
        examples = _warmup_examples(tokenizer, arguments["num_warmup_examples"], seed, arguments["style_rate"])
        _warm_up(
            model,
            tokenizer,
            examples,
            num_epochs=arguments["num_epochs"],
            batch_size=arguments["batch_size"],
            learning_rate=arguments["learning_rate"],
            seed=seed,
            show_progress=show_progress,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return str(path)


def _default_arguments() -> dict[str, Any]:
    parameters = inspect.signature(build_student).parameters
    names = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "num_corpus_rows",
        "num_warmup_examples",
        "num_epochs",
        "batch_size",
        "learning_rate",
        "style_rate",
    )
    return {name: parameters[name].default for name in names}
