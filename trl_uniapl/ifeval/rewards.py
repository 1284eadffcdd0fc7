"""IFEval reward functions for TRL's GRPO, scored by lm-eval's own instruction checkers.

The functions read rows in the IFEval format of [google/IFEval](https://huggingface.co/datasets/google/IFEval): a
column `instruction_id_list` (`list[str]`, ids of `lm_eval.tasks.ifeval.instructions_registry.INSTRUCTION_DICT`) and a
column `kwargs` (one entry per instruction: the keyword arguments of the checker's `build_description`). Each
`kwargs` entry may be

- a `dict`, where keys whose value is falsy (`None`, `""`, `[]`, `0`) are dropped, exactly as lm-eval does; this is
  how google/IFEval and [`task`] store it (every key present, unused ones `None`, so Arrow can store rows
  with different instructions in one column), or
- a JSON string of such a dict.

Rows may also carry a column `topic_keywords` (`list[str]`), as the embedded task of [`task`] does. When a
row has non-empty topic keywords, the response must also *mention the topic*: at least one keyword must appear as a
whole word, case-insensitively (see [`mentions_topic`]). The topic check counts as one more instruction: an
off-topic response scores 0 with [`ifeval_strict_reward`] and [`ifeval_loose_reward`], and loses one of `n + 1`
points with [`ifeval_dense_reward`]. Rows without the column (or with an empty list) are scored as plain IFEval.

Scoring calls lm-eval's `test_instruction_following_strict` / `test_instruction_following_loose` unchanged, so the
rewards agree with lm-eval's IFEval metrics. Before that, every instruction is validated: an unknown id, a `kwargs`
entry that is not a dict, a keyword the checker's `build_description` does not take, or a missing argument (for which
lm-eval would silently draw a *random* value, making the score random) raises a `ValueError` naming the row.

Offline behaviour: importing lm-eval's IFEval modules tries to download the NLTK `punkt_tab` data and then prints
"Downloaded punkt_tab on rank 0" even when the download failed. This module imports them with `nltk.download`
disabled and that line swallowed. When the punkt data is missing, lm-eval's sentence counter
(`instructions_util.count_sentences`, used by `length_constraints:number_sentences`) and NLTK's `word_tokenize`
(used by `change_case:capital_word_frequency`) would raise `LookupError`; they are then replaced, inside lm-eval's
`instructions_util` module only, by lm-eval's own regex splitter `instructions_util.split_into_sentences`, and a
warning is logged once. Install the data (`python -m nltk.downloader punkt_tab`) to score with punkt instead;
[`sentence_splitter`] tells which one is in use.

Determinism: `change_case:*` and `language:response_language` call `langdetect`, which samples unless seeded;
`langdetect.DetectorFactory.seed` is set to 0 on import.

Example:

```python
from trl import GRPOConfig, GRPOTrainer

from trl_uniapl.ifeval.rewards import ifeval_dense_reward

trainer = GRPOTrainer(model=..., reward_funcs=[ifeval_dense_reward], train_dataset=dataset, args=GRPOConfig(...))
```

or from the command line: `trl grpo ... --reward_funcs trl_uniapl.ifeval.rewards.ifeval_dense_reward`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import langdetect
import nltk

logger = logging.getLogger(__name__)

_MISLEADING_LINE = "Downloaded punkt_tab on rank 0"
_INSTRUCTIONS_UTIL = "lm_eval.tasks.ifeval.instructions_util"


def _punkt_available() -> bool:
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def _import_instructions_util():
    """Import lm-eval's `instructions_util` without the NLTK download attempt and its misleading print."""
    if _INSTRUCTIONS_UTIL in sys.modules or _punkt_available():
        from lm_eval.tasks.ifeval import instructions_util

        return instructions_util
    original_download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # no network: never try
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            from lm_eval.tasks.ifeval import instructions_util
    finally:
        nltk.download = original_download
    other_output = "".join(line for line in buffer.getvalue().splitlines(True) if _MISLEADING_LINE not in line)
    if other_output:
        sys.stdout.write(other_output)
    return instructions_util


instructions_util = _import_instructions_util()

from lm_eval.tasks.ifeval import instructions_registry  # noqa: E402
from lm_eval.tasks.ifeval import utils as ifeval_utils  # noqa: E402

langdetect.DetectorFactory.seed = 0

_SENTENCE_SPLITTER = "punkt"


def _regex_count_sentences(text: str) -> int:
    """Count sentences with lm-eval's regex splitter (fallback when NLTK punkt data is missing)."""
    return len(instructions_util.split_into_sentences(text))


class _NltkWithoutPunkt:
    """Stand-in for the `nltk` module inside lm-eval's `instructions_util` when punkt data is missing.

    `word_tokenize` splits sentences with lm-eval's regex splitter instead of punkt, then runs NLTK's Treebank word
    tokenizer on each sentence, which is what `nltk.word_tokenize` does with punkt. Everything else is NLTK's.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(nltk, name)

    @staticmethod
    def word_tokenize(text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        sentences = [text] if preserve_line else instructions_util.split_into_sentences(text)
        return [token for sentence in sentences for token in nltk.word_tokenize(sentence, preserve_line=True)]


def _install_offline_fallbacks() -> None:
    global _SENTENCE_SPLITTER
    replaced = []
    try:
        instructions_util._get_sentence_tokenizer()
    except LookupError:
        instructions_util.count_sentences = _regex_count_sentences
        replaced.append("`instructions_util.count_sentences` (length_constraints:number_sentences)")
    try:
        nltk.word_tokenize("Probe. Probe.")
    except LookupError:
        instructions_util.nltk = _NltkWithoutPunkt()
        replaced.append("`nltk.word_tokenize` (change_case:capital_word_frequency)")
    if replaced:
        _SENTENCE_SPLITTER = "regex"
        logger.warning(
            "NLTK 'punkt_tab' data is not installed (and is not downloaded: no network is assumed). Sentence "
            "splitting for %s uses lm-eval's regex splitter `instructions_util.split_into_sentences` instead of "
            "punkt; sentence counts can differ from punkt's on unusual text. Install the data with "
            "`python -m nltk.downloader punkt_tab` to use punkt.",
            " and ".join(replaced),
        )


_install_offline_fallbacks()


def sentence_splitter() -> str:
    """Return `"punkt"` when lm-eval's checkers split sentences with NLTK punkt, `"regex"` when the offline fallback
    (lm-eval's `split_into_sentences`) is in use because the punkt data is missing."""
    return _SENTENCE_SPLITTER


class InstructionCheck(NamedTuple):
    """Result of [`check_response`] for one response.

    Attributes:
        follow_instruction_list (`list[bool]`):
            One entry per IFEval instruction of the row, as lm-eval's `OutputExample.follow_instruction_list`.
        on_topic (`bool` or `None`):
            Result of the topic check, `None` when the row has no topic keywords.
    """

    follow_instruction_list: list[bool]
    on_topic: bool | None

    @property
    def results(self) -> list[bool]:
        """Instruction results with the topic check appended as one more instruction when there is one."""
        return self.follow_instruction_list + ([] if self.on_topic is None else [self.on_topic])

    @property
    def follow_all(self) -> bool:
        """Prompt-level result: every instruction followed and, if checked, on topic."""
        return all(self.results)


@functools.cache
def _accepted_arguments(instruction_id: str) -> tuple[str, ...]:
    cls = instructions_registry.INSTRUCTION_DICT[instruction_id]
    parameters = inspect.signature(cls.build_description).parameters
    return tuple(name for name in parameters if name != "self")


@functools.lru_cache(maxsize=4096)
def _validate(instruction_id: str, kwargs_json: str) -> str | None:
    """Return an error message (without the row index) or `None` when the instruction is valid."""
    if instruction_id not in instructions_registry.INSTRUCTION_DICT:
        return (
            f"unknown instruction id {instruction_id!r}. Use one of the ids of lm_eval.tasks.ifeval."
            f"instructions_registry.INSTRUCTION_DICT: {sorted(instructions_registry.INSTRUCTION_DICT)}"
        )
    kwargs = json.loads(kwargs_json)
    accepted = _accepted_arguments(instruction_id)
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        return (
            f"kwargs {kwargs} for instruction {instruction_id!r} has keys {unexpected} that its checker's "
            f"`build_description` does not take (it takes {list(accepted)}). Fix the row's kwargs entry for this "
            "instruction (keys with value None are ignored)."
        )
    instruction = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    try:
        instruction.build_description(**kwargs)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        return (
            f"kwargs {kwargs} for instruction {instruction_id!r} are rejected by its checker's `build_description`: "
            f"{str(error).rstrip('.')}. Fix the row's kwargs entry for this instruction."
        )
    missing = [key for key in instruction.get_instruction_args_keys() if key not in kwargs and key != "prompt"]
    if missing:
        return (
            f"kwargs {kwargs} for instruction {instruction_id!r} lack {missing}; lm-eval would draw them at random, "
            f"which makes the score random. Add them to the row's kwargs entry for this instruction."
        )
    return None


def normalize_ifeval_kwargs(
    instruction_id_list: Sequence[str], kwargs: Sequence[dict | str | None], row_index: int = 0
) -> list[dict[str, Any]]:
    """Validate one IFEval row and return its kwargs as plain dicts, falsy values dropped (as lm-eval does).

    Args:
        instruction_id_list (`Sequence[str]`):
            Instruction ids of the row.
        kwargs (`Sequence[dict | str | None]`):
            One entry per instruction: a dict (falsy values ignored), a JSON string of a dict, or `None` (no args).
        row_index (`int`, *optional*, defaults to `0`):
            Index of the row, used in error messages.

    Returns:
        `list[dict[str, Any]]`: one dict of `build_description` keyword arguments per instruction.

    Raises:
        `ValueError`: unknown instruction id, malformed kwargs entry, unexpected or missing keys, or a length mismatch.
    """
    if isinstance(instruction_id_list, str) or not isinstance(instruction_id_list, Sequence):
        raise ValueError(
            f"Row {row_index}: `instruction_id_list` must be a list of instruction ids, got {instruction_id_list!r}."
        )
    if kwargs is None or isinstance(kwargs, (str, dict)) or len(kwargs) != len(instruction_id_list):
        raise ValueError(
            f"Row {row_index}: `kwargs` must be a list with one entry per instruction of {list(instruction_id_list)}, "
            f"got {kwargs!r}. Give one dict (or JSON string of a dict) per instruction, `{{}}` for none."
        )
    normalized = []
    for instruction_id, entry in zip(instruction_id_list, kwargs):
        if entry is None:
            entry = {}
        if isinstance(entry, str):
            try:
                entry = json.loads(entry) if entry.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"Row {row_index}: kwargs entry {entry!r} for instruction {instruction_id!r} is not valid JSON "
                    f"({error}). Store a dict, or a JSON string of a dict such as '{{\"num_bullets\": 3}}'."
                ) from None
        if not isinstance(entry, dict):
            raise ValueError(
                f"Row {row_index}: kwargs entry {entry!r} for instruction {instruction_id!r} is not a dict. Store a "
                "dict of the checker's `build_description` arguments (or a JSON string of one)."
            )
        clean = {key: value for key, value in entry.items() if value}
        try:
            clean_json = json.dumps(clean, sort_keys=True)
        except TypeError as error:
            raise ValueError(
                f"Row {row_index}: kwargs entry {entry!r} for instruction {instruction_id!r} holds values that are "
                f"not plain JSON data ({error})."
            ) from None
        message = _validate(str(instruction_id), clean_json)
        if message is not None:
            raise ValueError(f"Row {row_index}: {message}")
        normalized.append(clean)
    return normalized


def mentions_topic(response: str, topic_keywords: Sequence[str]) -> bool:
    """Return whether `response` mentions the topic: at least one of `topic_keywords` appears as a whole word
    (regex `\\b<keyword>\\b`), ignoring case."""
    return any(
        re.search(r"\b" + re.escape(keyword) + r"\b", response, flags=re.IGNORECASE)
        for keyword in topic_keywords
        if keyword
    )


def check_response(
    response: str,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[dict | str | None],
    topic_keywords: Sequence[str] | None = None,
    prompt: str = "",
    loose: bool = False,
    row_index: int = 0,
) -> InstructionCheck:
    """Score one response against one IFEval row with lm-eval's strict (or loose) instruction-following test.

    Args:
        response (`str`):
            The model's response.
        instruction_id_list (`Sequence[str]`):
            Instruction ids of the row.
        kwargs (`Sequence[dict | str | None]`):
            The row's kwargs, see [`normalize_ifeval_kwargs`].
        topic_keywords (`Sequence[str]` or `None`, *optional*):
            Topic keywords; when non-empty the topic check of [`mentions_topic`] is added.
        prompt (`str`, *optional*, defaults to `""`):
            The prompt text, passed to lm-eval as `InputExample.prompt`.
        loose (`bool`, *optional*, defaults to `False`):
            Use `test_instruction_following_loose` (response variants without first/last line and without `*`).
            The topic check is the same in both modes (removing text cannot add a keyword).
        row_index (`int`, *optional*, defaults to `0`):
            Index of the row, used in error messages.

    Returns:
        [`InstructionCheck`]: per-instruction results and the topic result.
    """
    normalized = normalize_ifeval_kwargs(instruction_id_list, kwargs, row_index=row_index)
    example = ifeval_utils.InputExample(
        key=row_index, instruction_id_list=list(instruction_id_list), prompt=prompt, kwargs=normalized
    )
    test = ifeval_utils.test_instruction_following_loose if loose else ifeval_utils.test_instruction_following_strict
    output = test(example, response)
    on_topic = None
    if topic_keywords:
        on_topic = bool(response.strip()) and mentions_topic(response, topic_keywords)
    return InstructionCheck(list(output.follow_instruction_list), on_topic)


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """Return the text of a completion, either a string or a conversational list of messages (last message)."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def prompt_text(prompt: str | Sequence[dict[str, Any]]) -> str:
    """Return the text of a prompt, either a string or a conversational list of messages (last user message)."""
    if isinstance(prompt, str):
        return prompt
    user_messages = [message for message in prompt if message.get("role") == "user"]
    return completion_text(user_messages or list(prompt))


def _score_rows(
    prompts: Sequence, completions: Sequence, reward_kwargs: dict[str, Any], loose: bool
) -> list[InstructionCheck | None]:
    missing = [column for column in ("instruction_id_list", "kwargs") if column not in reward_kwargs]
    if missing:
        raise ValueError(
            f"IFEval rewards need the dataset columns 'instruction_id_list' and 'kwargs' (google/IFEval format); "
            f"missing {missing}. Columns passed: {sorted(reward_kwargs)}."
        )
    instruction_lists = reward_kwargs["instruction_id_list"]
    kwargs_lists = reward_kwargs["kwargs"]
    topic_lists = reward_kwargs.get("topic_keywords") or [None] * len(completions)
    results: list[InstructionCheck | None] = []
    for index, completion in enumerate(completions):
        instruction_id_list = instruction_lists[index]
        if instruction_id_list is None:  # not an IFEval row (e.g. a mixed dataset)
            results.append(None)
            continue
        results.append(
            check_response(
                completion_text(completion),
                instruction_id_list,
                kwargs_lists[index],
                topic_keywords=topic_lists[index],
                prompt=prompt_text(prompts[index]) if prompts is not None else "",
                loose=loose,
                row_index=index,
            )
        )
    return results


def ifeval_dense_reward(
    prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None, **kwargs: Any
) -> list[float | None]:
    """Fraction of the row's instructions followed (lm-eval strict), the topic check counting as one more.

    TRL reward-function signature. Needs the dataset columns `instruction_id_list` and `kwargs`; reads
    `topic_keywords` when present. Returns `None` for rows whose `instruction_id_list` is `None`, and `1.0` for a row
    with no instruction and no topic (IFEval counts an empty list as followed).
    """
    rewards: list[float | None] = []
    for check in _score_rows(prompts, completions, kwargs, loose=False):
        if check is None:
            rewards.append(None)
        else:
            results = check.results
            rewards.append(sum(results) / len(results) if results else 1.0)
    return rewards


def ifeval_strict_reward(
    prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when every instruction is followed (lm-eval strict, IFEval's `prompt_level_strict_acc`) and the response is
    on topic, else 0.0.

    TRL reward-function signature. Needs the dataset columns `instruction_id_list` and `kwargs`; reads
    `topic_keywords` when present. Returns `None` for rows whose `instruction_id_list` is `None`.
    """
    return [
        None if check is None else float(check.follow_all)
        for check in _score_rows(prompts, completions, kwargs, loose=False)
    ]


def ifeval_loose_reward(
    prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when every instruction is followed under IFEval's loose test (`prompt_level_loose_acc`: an instruction
    counts as followed if any of the response, the response without its first line, without its last line, without
    both, and those four with `*` removed passes) and the response is on topic, else 0.0.

    TRL reward-function signature. Needs the dataset columns `instruction_id_list` and `kwargs`; reads
    `topic_keywords` when present. Returns `None` for rows whose `instruction_id_list` is `None`.
    """
    return [
        None if check is None else float(check.follow_all)
        for check in _score_rows(prompts, completions, kwargs, loose=True)
    ]
