"""An offline instruction-following task in IFEval format, with a programmatic expert.

The Hugging Face Hub is out of reach, and IFEval itself is far beyond what a model of one or two million parameters can
learn, so this module generates a small task of the same shape. Each prompt asks for a short note about one of
[`TOPICS`] and adds one to three IFEval instructions drawn from [`INSTRUCTION_IDS`]. The instruction text is produced
by the lm-eval checkers' own `build_description(**kwargs)`, and the rows carry the IFEval columns
`instruction_id_list` and `kwargs`, so [`rewards`] and [`evaluation`] score them with lm-eval's
checkers, exactly as they would score google/IFEval.

Three choices keep the task from being gamed by one constant, prompt-independent reply:

- every row has a topic, checked through the `topic_keywords` column (at least one keyword as a whole word, see
  [`rewards.mentions_topic`]), and [`TOPICS`] do not share keywords;
- `change_case:english_lowercase` and `change_case:english_capital` are mutually exclusive ([`EXCLUSIVE_INSTRUCTIONS`]:
  never in one prompt), so no reply can satisfy every case instruction;
- `keywords:forbidden_words` forbids words of the row's own topic (never its main word `topic_keywords[0]`, never a
  word of `keywords:existence`), so the usual note on the topic often fails it.

[`teacher_response`] is the expert: it follows every instruction of its row and stays on topic, in a few lines (about
30 tokens of the student's tokenizer on average, 99% under 56). Where the outcome depends on `langdetect` (the case
checkers ask it whether the text is English, which is unreliable on short text) or on a word count, the teacher checks
its candidate with lm-eval's checker and, if needed, takes the next of a few deterministic alternatives. Without a
case instruction, the teacher writes mixed case and always uses a comma; it adds no title, quotation marks, bullets,
postscript or end phrase unless asked, so each instruction's effect appears (almost) only when requested, see
[`evaluation.evaluate_ifeval`]. [`plain_response`] writes on topic and ignores every instruction: the
warm-up data of [`trl_uniapl.demo.student`].

[`make_splits`] returns seeded `demonstrations` (with teacher completions), `preference` (prompts only) and `eval`.
The `eval` split holds out generalisation on two axes: [`HELDOUT_TOPICS`] never appear in training rows, and training
rows never contain a pair of [`HELDOUT_COMBINATIONS`]; columns `unseen_topic` and `unseen_combination` flag such rows.

`kwargs` storage: each row's `kwargs` is a list of dicts that all have the keys of [`KWARG_KEYS`], unused ones `None`
(the google/IFEval layout, storable by Arrow). The rewards also accept JSON strings of dicts.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value

from .rewards import instructions_registry, normalize_ifeval_kwargs, prompt_text

TASK_VERSION = "1"


@dataclass(frozen=True)
class Topic:
    """One topic of the task.

    Attributes:
        name (`str`): How prompts name it ("Write a short note about {name}.").
        title (`str`): The teacher's title when one is requested; it contains no word of `keywords[1:]`.
        keywords (`tuple[str, ...]`): Topic keywords; `keywords[0]` is the main word and also appears in `name`.
        sentences (`tuple[str, ...]`): On-topic sentences, each of at most 12 words, each with at least one keyword.
            The first, the lead, starts with `name`, has a comma and no word of `keywords[1:]` (so it is never
            forbidden); the teacher always opens with it, which lets a student name an unseen topic by copying it.
    """

    name: str
    title: str
    keywords: tuple[str, ...]
    sentences: tuple[str, ...]


def load_topics() -> tuple[Topic, ...]:
    """The task's topics, from the package data file `trl_uniapl/ifeval/data/topics.json`."""
    with resources.files("trl_uniapl.ifeval").joinpath("data", "topics.json").open(encoding="utf-8") as f:
        table = json.load(f)
    return tuple(
        Topic(topic["name"], topic["title"], tuple(topic["keywords"]), tuple(topic["sentences"]))
        for topic in table["topics"]
    )


TOPICS: tuple[Topic, ...] = load_topics()
"""All topics, training topics first, the eight held-out topics ([`HELDOUT_TOPICS`]) last."""

NUM_HELDOUT_TOPICS = 8
TRAIN_TOPICS: tuple[Topic, ...] = TOPICS[:-NUM_HELDOUT_TOPICS]
HELDOUT_TOPICS: tuple[Topic, ...] = TOPICS[-NUM_HELDOUT_TOPICS:]
TOPICS_BY_NAME: dict[str, Topic] = {topic.name: topic for topic in TOPICS}

LOWERCASE = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
QUOTATION = "startend:quotation"
END_CHECKER = "startend:end_checker"
TITLE = "detectable_format:title"
EXISTENCE = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
NUMBER_WORDS = "length_constraints:number_words"
BULLETS = "detectable_format:number_bullet_lists"
POSTSCRIPT = "detectable_content:postscript"

INSTRUCTION_IDS: tuple[str, ...] = (
    LOWERCASE,
    CAPITAL,
    NO_COMMA,
    QUOTATION,
    END_CHECKER,
    TITLE,
    EXISTENCE,
    FORBIDDEN,
    NUMBER_WORDS,
    BULLETS,
    POSTSCRIPT,
)
"""The IFEval instruction types of the task (ids of lm-eval's `INSTRUCTION_DICT`)."""

EXCLUSIVE_INSTRUCTIONS: tuple[frozenset[str], ...] = (frozenset({LOWERCASE, CAPITAL}),)
"""Pairs of instructions that contradict each other and never appear in one prompt."""

HELDOUT_COMBINATIONS: tuple[frozenset[str], ...] = (
    frozenset({NO_COMMA, QUOTATION}),
    frozenset({TITLE, POSTSCRIPT}),
    frozenset({CAPITAL, END_CHECKER}),
    frozenset({LOWERCASE, BULLETS}),
    frozenset({EXISTENCE, NUMBER_WORDS}),
)
"""Pairs of instructions that no training row contains; `eval` rows flagged `unseen_combination` contain one."""

END_PHRASES: tuple[str, ...] = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "That is all for today.",
)
"""End phrases of `startend:end_checker` (the first two are lm-eval's own options)."""

EXISTENCE_KEYWORDS: tuple[str, ...] = ("window", "friend", "story", "music", "family", "journey", "smile", "lesson")
"""Words that `keywords:existence` asks for; none is a topic keyword."""

POSTSCRIPT_MARKERS: tuple[str, ...] = ("P.S.", "P.P.S")
INSTRUCTION_COUNT_WEIGHTS: tuple[float, float, float] = (0.5, 0.35, 0.15)
"""Probabilities of one, two and three instructions in a prompt."""
NUMBER_WORDS_OPTIONS: dict[str, tuple[int, ...]] = {"less than": (30, 40, 50), "at least": (15, 20, 25, 30)}
NUM_BULLETS_OPTIONS: tuple[int, ...] = (1, 2, 3)
PROMPT_OPENERS: tuple[str, ...] = (
    "Write a short note about {name}.",
    "Tell me about {name}.",
    "Write a few lines about {name}.",
)

_KEYWORD_SENTENCE = "It also brings to mind {words}."
_POSTSCRIPT = "Thanks for asking about {name}."
_FALLBACK_SENTENCES = (
    "This is a short note about {main}, and I hope that you like it.",
    "People often talk about {main}, and they rarely get bored.",
    "There is always more to say about {main}, of course.",
    "Here is what I know about {main}, in a few words.",
)

KWARG_KEYS: tuple[str, ...] = (
    "end_phrase",
    "forbidden_words",
    "keywords",
    "num_bullets",
    "num_words",
    "postscript_marker",
    "relation",
)
"""Keys of every `kwargs` dict of the task's rows (unused ones are `None`)."""

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_KWARGS = List(
    {
        "end_phrase": Value("string"),
        "forbidden_words": List(Value("string")),
        "keywords": List(Value("string")),
        "num_bullets": Value("int64"),
        "num_words": Value("int64"),
        "postscript_marker": Value("string"),
        "relation": Value("string"),
    }
)
_BASE_FEATURES = {
    "prompt": _MESSAGES,
    "instruction_id_list": List(Value("string")),
    "kwargs": _KWARGS,
    "topic": Value("string"),
    "topic_keywords": List(Value("string")),
}
SPLIT_FEATURES: dict[str, Features] = {
    "demonstrations": Features({**_BASE_FEATURES, "completion": _MESSAGES}),
    "preference": Features(_BASE_FEATURES),
    "eval": Features(
        {
            **_BASE_FEATURES,
            "expert_completion": _MESSAGES,
            "unseen_topic": Value("bool"),
            "unseen_combination": Value("bool"),
        }
    ),
}
"""Arrow schema of each split of [`make_splits`]."""


def _contains_word(text: str, words: Sequence[str]) -> bool:
    return any(re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) for word in words)


def _conflicts(instruction_ids: Sequence[str], exclude_pairs: Sequence[frozenset[str]]) -> bool:
    chosen = set(instruction_ids)
    return any(pair <= chosen for pair in (*EXCLUSIVE_INSTRUCTIONS, *exclude_pairs))


def _sample_kwargs(instruction_id: str, topic: Topic, rng: random.Random) -> dict[str, Any]:
    if instruction_id == EXISTENCE:
        return {"keywords": [rng.choice(EXISTENCE_KEYWORDS)]}
    if instruction_id == FORBIDDEN:
        return {"forbidden_words": sorted(rng.sample(topic.keywords[1:], rng.choice((1, 2))))}
    if instruction_id == NUMBER_WORDS:
        relation = rng.choice(tuple(NUMBER_WORDS_OPTIONS))
        return {"num_words": rng.choice(NUMBER_WORDS_OPTIONS[relation]), "relation": relation}
    if instruction_id == BULLETS:
        return {"num_bullets": rng.choice(NUM_BULLETS_OPTIONS)}
    if instruction_id == POSTSCRIPT:
        return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
    if instruction_id == END_CHECKER:
        return {"end_phrase": rng.choice(END_PHRASES)}
    return {}


def _sample_instruction_ids(rng: random.Random, unseen_combination: bool) -> list[str]:
    num_instructions = rng.choices((1, 2, 3), weights=INSTRUCTION_COUNT_WEIGHTS)[0]
    while True:
        if unseen_combination:
            # sorted: a frozenset iterates in string-hash order, which PYTHONHASHSEED changes from one process to the
            # next; the draws after it (shuffle, kwargs) must see the same list in every process.
            chosen = sorted(rng.choice(HELDOUT_COMBINATIONS))
            if num_instructions == 3:
                chosen.append(rng.choice([i for i in INSTRUCTION_IDS if i not in chosen]))
            rng.shuffle(chosen)
            if not _conflicts(chosen, ()):
                return chosen
        else:
            chosen = rng.sample(INSTRUCTION_IDS, num_instructions)
            if not _conflicts(chosen, HELDOUT_COMBINATIONS):
                return chosen


def make_row(
    topic: Topic, instruction_id_list: Sequence[str], kwargs: Sequence[dict[str, Any]], opener: int = 0
) -> dict[str, Any]:
    """Build one row: the prompt text comes from the checkers' own `build_description(**kwargs)`.

    Args:
        topic ([`Topic`]): The topic of the note.
        instruction_id_list (`Sequence[str]`): Ids of [`INSTRUCTION_IDS`].
        kwargs (`Sequence[dict[str, Any]]`): Arguments of each instruction (missing [`KWARG_KEYS`] become `None`).
        opener (`int`, *optional*, defaults to `0`): Index of [`PROMPT_OPENERS`].

    Returns:
        `dict[str, Any]`: a row with conversational `prompt`, `instruction_id_list`, `kwargs`, `topic` and
        `topic_keywords`.
    """
    descriptions = []
    for instruction_id, arguments in zip(instruction_id_list, kwargs):
        checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        descriptions.append(checker.build_description(**{k: v for k, v in arguments.items() if v is not None}))
    text = " ".join([PROMPT_OPENERS[opener].format(name=topic.name), *descriptions])
    return {
        "prompt": [{"role": "user", "content": text}],
        "instruction_id_list": list(instruction_id_list),
        "kwargs": [{key: arguments.get(key) for key in KWARG_KEYS} for arguments in kwargs],
        "topic": topic.name,
        "topic_keywords": list(topic.keywords),
    }


def sample_row(rng: random.Random, topics: Sequence[Topic] = TRAIN_TOPICS, unseen_combination: bool = False) -> dict:
    """Sample one row from `rng`: a topic of `topics`, one to three instructions and their arguments.

    Args:
        rng (`random.Random`): Source of randomness.
        topics (`Sequence[Topic]`, *optional*, defaults to [`TRAIN_TOPICS`]): Topics to draw from.
        unseen_combination (`bool`, *optional*, defaults to `False`): If `True`, the row contains a pair of
            [`HELDOUT_COMBINATIONS`]; if `False`, it contains none.

    Returns:
        `dict`: a row as [`make_row`] builds it.
    """
    topic = rng.choice(topics)
    instruction_id_list = _sample_instruction_ids(rng, unseen_combination)
    kwargs = [_sample_kwargs(instruction_id, topic, rng) for instruction_id in instruction_id_list]
    return make_row(topic, instruction_id_list, kwargs, opener=rng.randrange(len(PROMPT_OPENERS)))


def generate_rows(
    num_rows: int, seed: int = 0, topics: Sequence[Topic] = TRAIN_TOPICS, unseen_combination: bool = False
) -> list[dict]:
    """Generate `num_rows` rows with [`sample_row`] from `random.Random(seed)` (duplicates possible).

    Returns:
        `list[dict]`: rows as [`make_row`] builds them.
    """
    rng = random.Random(seed)
    return [sample_row(rng, topics, unseen_combination) for _ in range(num_rows)]


def _row_seed(row: dict) -> int:
    key = json.dumps(
        [prompt_text(row["prompt"]), row["instruction_id_list"], row["topic"]], sort_keys=True, default=str
    )
    return zlib.crc32(key.encode())


def plain_response(row: dict, seed: int | None = None) -> str:
    """An on-topic answer that ignores every instruction of `row`: the topic's lead sentence and up to two others.

    Args:
        row (`dict`): A row of the task (needs `topic`).
        seed (`int` or `None`, *optional*): Seed for the choice of sentences; by default derived from the row.

    Returns:
        `str`: the answer.
    """
    topic = TOPICS_BY_NAME[row["topic"]]
    rng = random.Random(_row_seed(row) if seed is None else seed)
    return " ".join([topic.sentences[0], *rng.sample(topic.sentences[1:], rng.choice((0, 1, 2)))])


def teacher_response(row: dict) -> str:
    """The expert's answer to `row`: on topic, following every instruction (deterministic for a given row).

    Layout, one part per line, each only if asked: `<<title>>`; the topic's lead sentence and, usually, the next
    sentence without a forbidden word (more to reach an `at least` word count, only the lead in capitals); exactly
    `num_bullets` bullets `* keyword`; a keyword sentence; the postscript; the end phrase. Then commas are removed, the
    case changed and the whole wrapped in quotes as asked. Where the case checkers' `langdetect` call or a word count
    decides, the shortest of a few deterministic alternatives that passes lm-eval's checker is returned.

    Args:
        row (`dict`): A row of the task (`topic`, `instruction_id_list`, `kwargs`).

    Returns:
        `str`: the answer.

    Raises:
        `ValueError`: if the row has an instruction outside [`INSTRUCTION_IDS`] or malformed kwargs.
    """
    topic = TOPICS_BY_NAME[row["topic"]]
    instruction_ids = list(row["instruction_id_list"])
    unknown = sorted(set(instruction_ids) - set(INSTRUCTION_IDS))
    if unknown:
        raise ValueError(f"The teacher only follows {INSTRUCTION_IDS}; the row asks for {unknown}.")
    arguments = dict(zip(instruction_ids, normalize_ifeval_kwargs(instruction_ids, row["kwargs"])))
    main = topic.keywords[0]
    forbidden = arguments.get(FORBIDDEN, {}).get("forbidden_words", [])
    fallback = [sentence.format(main=main) for sentence in _FALLBACK_SENTENCES]
    lead = topic.sentences[0]
    rest = [sentence for sentence in topic.sentences[1:] if not _contains_word(sentence, forbidden)]
    allowed_keywords = [keyword for keyword in topic.keywords if keyword not in forbidden]
    postscript = _POSTSCRIPT.format(name=topic.name)

    def parts(body: list[str], num_sentences: int) -> str:
        lines = []
        if TITLE in arguments:
            lines.append(f"<<{topic.title}>>")
        lines.append(" ".join(body[:num_sentences]))
        if BULLETS in arguments:
            lines.extend(f"* {keyword}" for keyword in allowed_keywords[: arguments[BULLETS]["num_bullets"]])
        if EXISTENCE in arguments:
            lines.append(_KEYWORD_SENTENCE.format(words=" and ".join(arguments[EXISTENCE]["keywords"])))
        if POSTSCRIPT in arguments:
            lines.append(f"{arguments[POSTSCRIPT]['postscript_marker']} {postscript}")
        if END_CHECKER in arguments:
            lines.append(arguments[END_CHECKER]["end_phrase"])
        text = "\n".join(lines)
        if NO_COMMA in arguments:
            text = text.replace(", ", " ").replace(",", "")
        if LOWERCASE in arguments:
            text = text.lower()
        elif CAPITAL in arguments:
            text = text.upper()
        if QUOTATION in arguments:
            text = f'"{text}"'
        return text

    verify = [
        instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        for instruction_id in (LOWERCASE, CAPITAL, NUMBER_WORDS)
        if instruction_id in arguments
    ]
    for checker in verify:
        checker.build_description(**arguments[checker.id])
    default_sentences = 1 if CAPITAL in arguments else 2
    if NUMBER_WORDS in arguments and arguments[NUMBER_WORDS]["relation"] == "less than":
        counts = [default_sentences] + [n for n in (1, 2, 3, 4) if n != default_sentences]
    else:
        counts = list(range(default_sentences, 8))
    # The lead sentence (named topic, a comma, no forbidden word) comes first; the other allowed sentences follow in
    # their order, rotated on later attempts, with plain fallback sentences last (or second, after six attempts:
    # langdetect is unreliable on short capitalised text).
    text = ""
    for num_sentences in counts:  # the shortest answer that passes
        for attempt in range(12):
            others = rest[attempt % len(rest) :] + rest[: attempt % len(rest)] if rest else []
            if attempt >= 6:
                others.insert(0, fallback[attempt % len(fallback)])
            body = [lead, *others, *(sentence for sentence in fallback if sentence not in others)]
            text = parts(body, num_sentences)
            if all(checker.check_following(text) for checker in verify):
                return text
            if not verify:
                break
    return text


def _heldout_flags(rng: random.Random, unseen_topic_rate: float, unseen_combination_rate: float) -> tuple[bool, bool]:
    return rng.random() < unseen_topic_rate, rng.random() < unseen_combination_rate


def make_splits(
    seed: int = 0,
    num_demonstrations: int = 256,
    num_preference: int = 512,
    num_eval: int = 400,
    unseen_topic_rate: float = 0.2,
    unseen_combination_rate: float = 0.2,
) -> DatasetDict:
    """Generate the task's seeded splits; no two rows of any splits share a prompt.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of all choices.
        num_demonstrations (`int`, *optional*, defaults to `256`): Rows of `demonstrations`.
        num_preference (`int`, *optional*, defaults to `512`): Rows of `preference`.
        num_eval (`int`, *optional*, defaults to `400`): Rows of `eval`.
        unseen_topic_rate (`float`, *optional*, defaults to `0.2`): Share of `eval` rows on [`HELDOUT_TOPICS`].
        unseen_combination_rate (`float`, *optional*, defaults to `0.2`): Share of `eval` rows with a pair of
            [`HELDOUT_COMBINATIONS`].

    Returns:
        [`~datasets.DatasetDict`] with splits (schemas in [`SPLIT_FEATURES`]):

        - `demonstrations`: `prompt` (`[{"role": "user", ...}]`), `completion` (`[{"role": "assistant", ...}]`, the
          teacher's answer), `instruction_id_list`, `kwargs`, `topic`, `topic_keywords`;
        - `preference`: `prompt`, `instruction_id_list`, `kwargs`, `topic`, `topic_keywords`;
        - `eval`: as `preference`, plus `expert_completion` (the teacher's answer, conversational), `unseen_topic` and
          `unseen_combination` (`bool`).
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(topics: Sequence[Topic], unseen_combination: bool) -> dict:
        while True:
            row = sample_row(rng, topics, unseen_combination)
            text = prompt_text(row["prompt"])
            if text not in seen:
                seen.add(text)
                return row

    demonstrations = []
    for _ in range(num_demonstrations):
        row = draw(TRAIN_TOPICS, False)
        row["completion"] = [{"role": "assistant", "content": teacher_response(row)}]
        demonstrations.append(row)
    preference = [draw(TRAIN_TOPICS, False) for _ in range(num_preference)]
    evaluation = []
    for _ in range(num_eval):
        unseen_topic, unseen_combination = _heldout_flags(rng, unseen_topic_rate, unseen_combination_rate)
        row = draw(HELDOUT_TOPICS if unseen_topic else TRAIN_TOPICS, unseen_combination)
        row["expert_completion"] = [{"role": "assistant", "content": teacher_response(row)}]
        row["unseen_topic"] = unseen_topic
        row["unseen_combination"] = unseen_combination
        evaluation.append(row)
    return DatasetDict(
        {
            "demonstrations": Dataset.from_list(demonstrations, features=SPLIT_FEATURES["demonstrations"]),
            "preference": Dataset.from_list(preference, features=SPLIT_FEATURES["preference"]),
            "eval": Dataset.from_list(evaluation, features=SPLIT_FEATURES["eval"]),
        }
    )
