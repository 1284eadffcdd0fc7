"""The embedded instruction-following task: topics, prompts, the teacher, the splits and resistance to gaming."""

import collections
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_uniapl.ifeval import task  # noqa: E402
from trl_uniapl.ifeval.evaluation import DEFAULT_EFFECT_PROBES, _effect_appears  # noqa: E402
from trl_uniapl.ifeval.rewards import (  # noqa: E402
    check_response,
    ifeval_strict_reward,
    instructions_registry,
    instructions_util,
    prompt_text,
)

CONSTANT_REPLY = (
    '"<<a short note>>\nhere is a short note that i wrote for you today and i hope you like it\n'
    'p.s. thank you for reading\nany other questions?"'
)


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(seed=0)


def assert_row_invariants(row, train=True):
    ids = row["instruction_id_list"]
    assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
    assert set(ids) <= set(task.INSTRUCTION_IDS)
    for pair in task.EXCLUSIVE_INSTRUCTIONS:
        assert not pair <= set(ids)
    if train:
        for pair in task.HELDOUT_COMBINATIONS:
            assert not pair <= set(ids)
    assert all(list(kwargs) == list(task.KWARG_KEYS) for kwargs in row["kwargs"])
    topic = task.TOPICS_BY_NAME[row["topic"]]
    assert row["topic_keywords"] == list(topic.keywords)
    # The prompt text is the opener followed by the checkers' own descriptions.
    descriptions = []
    for instruction_id, kwargs in zip(ids, row["kwargs"]):
        checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        descriptions.append(checker.build_description(**{k: v for k, v in kwargs.items() if v is not None}))
    text = prompt_text(row["prompt"])
    assert any(text == " ".join([opener.format(name=topic.name), *descriptions]) for opener in task.PROMPT_OPENERS)
    arguments = dict(zip(ids, row["kwargs"]))
    forbidden = set((arguments.get(task.FORBIDDEN) or {}).get("forbidden_words") or [])
    required = set((arguments.get(task.EXISTENCE) or {}).get("keywords") or [])
    assert not forbidden & required
    assert forbidden <= set(topic.keywords[1:])


def test_topics_are_well_formed():
    keywords = collections.Counter(keyword for topic in task.TOPICS for keyword in topic.keywords)
    assert len(task.TOPICS) >= 30 + len(task.HELDOUT_TOPICS) and len(task.HELDOUT_TOPICS) >= 5
    assert max(keywords.values()) == 1, "topics must not share keywords"
    assert not set(keywords) & set(task.EXISTENCE_KEYWORDS)
    fixed_text = " ".join([*task.END_PHRASES, task._KEYWORD_SENTENCE, task._POSTSCRIPT, *task._FALLBACK_SENTENCES])
    assert not task._contains_word(fixed_text, list(keywords))
    for topic in task.TOPICS:
        lead = topic.sentences[0]
        assert lead.lower().startswith(topic.name) and topic.keywords[0] in topic.name
        assert "," in lead and not task._contains_word(lead, topic.keywords[1:])
        assert not task._contains_word(topic.title, topic.keywords[1:])
        for sentence in topic.sentences:
            assert instructions_util.count_words(sentence) <= 12, sentence
            assert task._contains_word(sentence, topic.keywords), sentence


def test_teacher_follows_every_instruction_on_10000_prompts():
    rows = task.generate_rows(7000, seed=123)
    rows += task.generate_rows(1500, seed=124, unseen_combination=True)
    rows += task.generate_rows(1500, seed=125, topics=task.HELDOUT_TOPICS)
    failures = []
    for row in rows:
        response = task.teacher_response(row)
        if not check_response(response, row["instruction_id_list"], row["kwargs"], row["topic_keywords"]).follow_all:
            failures.append((prompt_text(row["prompt"]), response))
    assert not failures, failures[:3]


def test_teacher_shows_no_unrequested_effects():
    rows = task.generate_rows(2000, seed=7)
    responses = [task.teacher_response(row) for row in rows]
    for instruction_id, probes in DEFAULT_EFFECT_PROBES.items():
        unrequested = [i for i, row in enumerate(rows) if instruction_id not in row["instruction_id_list"]]
        appeared = sum(_effect_appears(instruction_id, probes, responses[i]) for i in unrequested)
        assert appeared / len(unrequested) <= 0.01, instruction_id


def test_teacher_is_deterministic_and_plain_response_ignores_instructions():
    row = task.generate_rows(1, seed=3)[0]
    assert task.teacher_response(row) == task.teacher_response(dict(row))
    topic = task.TOPICS_BY_NAME[row["topic"]]
    for seed in range(20):
        plain = task.plain_response(row, seed=seed)
        assert plain.startswith(topic.sentences[0])
        assert all(sentence in topic.sentences for sentence in plain.replace(". ", ".|").split("|"))


def test_generated_rows_invariants():
    for row in task.generate_rows(3000, seed=11):
        assert_row_invariants(row)
    for row in task.generate_rows(500, seed=12, unseen_combination=True):
        assert_row_invariants(row, train=False)
        assert any(pair <= set(row["instruction_id_list"]) for pair in task.HELDOUT_COMBINATIONS)


def test_split_schema(splits):
    assert set(splits) == {"demonstrations", "preference", "eval"}
    assert [len(splits[name]) for name in ("demonstrations", "preference", "eval")] == [256, 512, 400]
    for name, dataset in splits.items():
        assert dataset.features == task.SPLIT_FEATURES[name]
    demonstration = splits["demonstrations"][0]
    assert demonstration["prompt"][0]["role"] == "user" and demonstration["completion"][0]["role"] == "assistant"
    assert demonstration["completion"][0]["content"] == task.teacher_response(demonstration)
    assert "completion" not in splits["eval"].column_names
    assert "completion" not in splits["preference"].column_names


def test_splits_are_seeded():
    first = task.make_splits(seed=5, num_demonstrations=20, num_preference=20, num_eval=20)
    again = task.make_splits(seed=5, num_demonstrations=20, num_preference=20, num_eval=20)
    other = task.make_splits(seed=6, num_demonstrations=20, num_preference=20, num_eval=20)
    for name in first:
        assert first[name].to_list() == again[name].to_list()
        assert first[name].to_list() != other[name].to_list()


def test_eval_holds_out_topics_and_combinations(splits):
    heldout_topics = {topic.name for topic in task.HELDOUT_TOPICS}
    prompts = []
    for name in ("demonstrations", "preference"):
        for row in splits[name]:
            assert row["topic"] not in heldout_topics
            assert_row_invariants(row)
            prompts.append(prompt_text(row["prompt"]))
    evaluation = splits["eval"]
    for row in evaluation:
        assert_row_invariants(row, train=False)
        assert (row["topic"] in heldout_topics) == row["unseen_topic"]
        has_heldout_pair = any(pair <= set(row["instruction_id_list"]) for pair in task.HELDOUT_COMBINATIONS)
        assert has_heldout_pair == row["unseen_combination"]
        prompts.append(prompt_text(row["prompt"]))
    assert len(set(prompts)) == len(prompts), "prompts repeat across splits"
    assert 40 <= sum(evaluation["unseen_topic"]) <= 130
    assert 40 <= sum(evaluation["unseen_combination"]) <= 130
    assert len({row["topic"] for row in evaluation if row["unseen_topic"]}) == len(heldout_topics)


def test_teacher_scores_full_marks_on_eval(splits):
    evaluation = splits["eval"]
    scores = ifeval_strict_reward(
        evaluation["prompt"],
        evaluation["expert_completion"],
        instruction_id_list=evaluation["instruction_id_list"],
        kwargs=evaluation["kwargs"],
        topic_keywords=evaluation["topic_keywords"],
    )
    assert sum(scores) == len(scores)


def test_constant_reply_is_not_rewarded(splits):
    """One prompt-independent reply (quoted, titled, lowercase, no commas, a P.S., an end phrase) passes many single
    instructions, but the topic check and the mutually exclusive case instructions leave it almost nothing."""
    evaluation = splits["eval"]
    columns = {"instruction_id_list": evaluation["instruction_id_list"], "kwargs": evaluation["kwargs"]}
    replies = [CONSTANT_REPLY] * len(evaluation)
    with_topic = ifeval_strict_reward(
        evaluation["prompt"], replies, topic_keywords=evaluation["topic_keywords"], **columns
    )
    without_topic = ifeval_strict_reward(evaluation["prompt"], replies, **columns)
    assert sum(with_topic) / len(with_topic) < 0.05
    assert sum(without_topic) / len(without_topic) > 0.2  # the reply is a real attempt at gaming IFEval alone


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), unseen=st.booleans())
def test_rows_and_teacher_property(seed, unseen):
    topics = task.HELDOUT_TOPICS if unseen else task.TRAIN_TOPICS
    rows = task.generate_rows(8, seed=seed, topics=topics, unseen_combination=unseen)
    assert rows == task.generate_rows(8, seed=seed, topics=topics, unseen_combination=unseen)
    for row in rows:
        assert_row_invariants(row, train=not unseen)
        response = task.teacher_response(row)
        assert check_response(response, row["instruction_id_list"], row["kwargs"], row["topic_keywords"]).follow_all


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=0, max_value=10_000))
def test_small_splits_property(seed):
    splits = task.make_splits(seed=seed, num_demonstrations=6, num_preference=6, num_eval=12)
    rng = random.Random(seed)
    row = splits["eval"][rng.randrange(12)]
    assert row["unseen_combination"] == any(
        pair <= set(row["instruction_id_list"]) for pair in task.HELDOUT_COMBINATIONS
    )
    for demonstration in splits["demonstrations"]:
        assert demonstration["completion"][0]["content"] == task.teacher_response(demonstration)


# Every piece of generated data, fingerprinted in a fresh interpreter: the splits (all three, row for row), the
# student's tokenizer corpus and its warm-up examples.
_FINGERPRINT_SCRIPT = """
import hashlib, json, random
from trl_uniapl.demo import student
from trl_uniapl.ifeval import task

splits = task.make_splits(seed=0, num_demonstrations=64, num_preference=64, num_eval=200)
payload = {name: split.to_list() for name, split in splits.items()}
payload["corpus"] = student.task_corpus(num_rows=200)
payload["restyled"] = [student._restyle("Here is a note, about tea. Any other questions?", random.Random(i), 0.5)
                       for i in range(20)]
print(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())
"""


def test_generated_data_is_identical_under_every_hash_seed():
    """A frozenset's iteration order follows string hashing (PYTHONHASHSEED, random per process): data generation
    must not depend on it, or every benchmark process scores its own variant of the test split."""
    import subprocess
    import sys

    digests = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _FINGERPRINT_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        digests.add(result.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
