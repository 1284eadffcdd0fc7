"""IFEval rewards against lm-eval's own scoring, error messages, offline sentence counting and determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_uniapl.ifeval import rewards  # noqa: E402  (import after the offline switch)
from trl_uniapl.ifeval.rewards import (  # noqa: E402
    check_response,
    ifeval_dense_reward,
    ifeval_loose_reward,
    ifeval_strict_reward,
    mentions_topic,
    normalize_ifeval_kwargs,
)

# lm-eval's own modules, imported by trl_uniapl.ifeval.rewards without the NLTK download attempt.
instructions_registry = rewards.instructions_registry
ifeval_utils = rewards.ifeval_utils

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Say hi."

# (instruction id, kwargs, a response that follows it, a response that violates it): every registered instruction.
CASES = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "I like apple pie.", "I like cake."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and cat", "one cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["dog"]}, "I like cats.", "My dog barks."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zigzag", "hello"),
    (
        "language:response_language",
        {"language": "en"},
        "This is a simple English sentence about the weather today.",
        "Ceci est une phrase française sur le temps qu'il fait aujourd'hui.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "at least"},
        "One thing. Two things. Three things.",
        "Just one sentence.",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "Only one."),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "two words",
        "far too many words in it",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First part.\n\nThen second part.",
        "First part.\n\nNow second part.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Sure."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA",
    ),
    ("detectable_format:json_format", {}, '{"a": 1}', "not json"),
    ("detectable_format:title", {}, "<<Title>>\ntext", "text"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "One answer."),
    ("combination:repeat_prompt", {"prompt_to_repeat": PROMPT}, "Say hi. Hi!", "Hi!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THIS IS loud.",
        "quiet words only.",
    ),
    (
        "change_case:english_capital",
        {},
        "THIS IS A LONG ENGLISH SENTENCE WRITTEN IN CAPITAL LETTERS FOR THE TEST.",
        "This is mixed.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "this is a long english sentence written in lowercase letters for the test.",
        "This is Mixed.",
    ),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
    ("startend:quotation", {}, '"quoted"', "not quoted"),
]

# Loose scoring differs from strict: the first line is a preamble, asterisks break the keyword.
LOOSE_ONLY = [
    ("startend:quotation", {}, 'Sure, here it is:\n"quoted"'),
    ("keywords:existence", {"keywords": ["apple"]}, "I like **app*le** pie."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\nBye."),
]


def lm_eval_scores(instruction_ids, kwargs, response, prompt=PROMPT):
    example = ifeval_utils.InputExample(key=0, instruction_id_list=instruction_ids, prompt=prompt, kwargs=kwargs)
    strict = ifeval_utils.test_instruction_following_strict(example, response)
    loose = ifeval_utils.test_instruction_following_loose(example, response)
    return strict.follow_instruction_list, loose.follow_instruction_list


def call(reward, response, instruction_ids, kwargs, conversational=True, **extra):
    completion = [{"role": "assistant", "content": response}] if conversational else response
    prompt = [{"role": "user", "content": PROMPT}] if conversational else PROMPT
    return reward([prompt], [completion], instruction_id_list=[instruction_ids], kwargs=[kwargs], **extra)[0]


def test_cases_cover_every_registered_instruction():
    assert {case[0] for case in CASES} == set(instructions_registry.INSTRUCTION_DICT)


@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("following", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_rewards_agree_with_lm_eval(case, following, conversational):
    instruction_id, kwargs, good, bad = case
    response = good if following else bad
    strict, loose = lm_eval_scores([instruction_id], [kwargs], response)
    assert strict == [following], "the hand-built case itself is wrong"
    assert call(ifeval_strict_reward, response, [instruction_id], [kwargs], conversational) == float(all(strict))
    assert call(ifeval_dense_reward, response, [instruction_id], [kwargs], conversational) == float(strict[0])
    assert call(ifeval_loose_reward, response, [instruction_id], [kwargs], conversational) == float(all(loose))


@pytest.mark.parametrize("case", LOOSE_ONLY, ids=[case[0] for case in LOOSE_ONLY])
def test_loose_reward_uses_ifeval_variants(case):
    instruction_id, kwargs, response = case
    strict, loose = lm_eval_scores([instruction_id], [kwargs], response)
    assert strict == [False] and loose == [True]
    assert call(ifeval_strict_reward, response, [instruction_id], [kwargs]) == 0.0
    assert call(ifeval_loose_reward, response, [instruction_id], [kwargs]) == 1.0


def test_multi_instruction_rows_agree_with_lm_eval():
    ids = [case[0] for case in CASES]
    kwargs = [case[1] for case in CASES]
    for response in [case[2] for case in CASES] + ["", "   "]:
        strict, loose = lm_eval_scores(ids, kwargs, response)
        assert call(ifeval_dense_reward, response, ids, kwargs) == pytest.approx(sum(strict) / len(strict))
        assert call(ifeval_strict_reward, response, ids, kwargs) == float(all(strict))
        assert call(ifeval_loose_reward, response, ids, kwargs) == float(all(loose))


def test_kwargs_formats_are_equivalent():
    """Plain dicts, google/IFEval-style dicts with every key (None when unused) and JSON strings score the same."""
    ids = ["keywords:existence", "detectable_format:number_bullet_lists", "detectable_format:title"]
    plain = [{"keywords": ["apple"]}, {"num_bullets": 2}, {}]
    all_keys = sorted({"keywords", "num_bullets", "relation", "end_phrase"})
    filled = [{key: entry.get(key) for key in all_keys} for entry in plain]
    as_json = [json.dumps(entry) for entry in plain]
    for response in ["<<Apple>>\n* apple\n* pie", "* apple", "nothing"]:
        scores = {
            call(ifeval_dense_reward, response, ids, kwargs) for kwargs in (plain, filled, as_json, [*plain[:2], None])
        }
        assert len(scores) == 1
    assert normalize_ifeval_kwargs(ids, filled) == plain


def test_topic_check():
    ids, kwargs = ["punctuation:no_comma"], [{}]
    topic = {"topic_keywords": [["ocean", "waves"]]}
    assert mentions_topic("The OCEAN is deep", ["ocean"])
    assert not mentions_topic("oceanic depths", ["ocean"])  # whole words only
    on, off = "Waves roll in", "Cats purr"
    assert call(ifeval_strict_reward, on, ids, kwargs, **topic) == 1.0
    assert call(ifeval_strict_reward, off, ids, kwargs, **topic) == 0.0
    assert call(ifeval_loose_reward, off, ids, kwargs, **topic) == 0.0
    assert call(ifeval_dense_reward, off, ids, kwargs, **topic) == 0.5  # the topic counts as one more instruction
    assert call(ifeval_dense_reward, "Cats, purr", ids, kwargs, **topic) == 0.0
    # Without the column, or with an empty list, the row is plain IFEval.
    assert call(ifeval_strict_reward, off, ids, kwargs) == 1.0
    assert call(ifeval_strict_reward, off, ids, kwargs, topic_keywords=[[]]) == 1.0
    check = check_response(off, ids, kwargs, topic_keywords=["ocean"])
    assert check.follow_instruction_list == [True] and check.on_topic is False and not check.follow_all


def test_rows_without_instructions_get_none_and_extra_kwargs_are_ignored():
    result = ifeval_dense_reward(
        ["a", "b"],
        ["x", "y, z"],
        instruction_id_list=[None, ["punctuation:no_comma"]],
        kwargs=[None, [{}]],
        trainer_state=None,
        other_column=[1, 2],
    )
    assert result == [None, 0.0]


@pytest.mark.parametrize(
    "ids, kwargs, expected",
    [
        (["no_such:instruction"], [{}], ["Row 1", "'no_such:instruction'", "INSTRUCTION_DICT"]),
        (["keywords:existence"], ["not json"], ["Row 1", "'keywords:existence'", "not valid JSON"]),
        (["keywords:existence"], [["apple"]], ["Row 1", "'keywords:existence'", "is not a dict"]),
        (["keywords:existence"], [{"keyword": ["apple"]}], ["Row 1", "['keyword']", "takes ['keywords']"]),
        (["keywords:existence"], [{}], ["Row 1", "lack ['keywords']", "at random"]),
        (
            ["length_constraints:number_words"],
            [{"num_words": 3, "relation": "more than"}],
            ["Row 1", "'length_constraints:number_words'", "more than", "Fix the row"],
        ),
        (
            ["keywords:existence", "punctuation:no_comma"],
            [{"keywords": ["a"]}],
            ["Row 1", "one entry per instruction"],
        ),
    ],
)
def test_malformed_rows_raise_clear_errors(ids, kwargs, expected):
    good_ids, good_kwargs = ["punctuation:no_comma"], [{}]
    with pytest.raises(ValueError) as error:
        ifeval_strict_reward(["p", "p"], ["a", "b"], instruction_id_list=[good_ids, ids], kwargs=[good_kwargs, kwargs])
    for fragment in expected:
        assert fragment in str(error.value)


def test_missing_columns_raise():
    with pytest.raises(ValueError, match="instruction_id_list"):
        ifeval_dense_reward(["p"], ["a"], kwargs=[[{}]])


def test_offline_import_is_quiet_and_counts_sentences():
    """A fresh interpreter imports the rewards without trying a download or printing lm-eval's false success line,
    and `length_constraints:number_sentences` works."""
    code = (
        "import trl_uniapl.ifeval.rewards as r\n"
        "ids = ['length_constraints:number_sentences', 'change_case:capital_word_frequency']\n"
        "kw = [{'num_sentences': 3, 'relation': 'at least'},\n"
        "      {'capital_frequency': 2, 'capital_relation': 'at least'}]\n"
        "print(r.sentence_splitter())\n"
        "print(r.ifeval_dense_reward(['p'], ['One DOG. Two CATS. Three.'], instruction_id_list=[ids], kwargs=[kw]))\n"
        "print(r.ifeval_dense_reward(['p'], ['Only one.'], instruction_id_list=[ids], kwargs=[kw]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Downloaded punkt_tab" not in result.stdout + result.stderr
    assert "Error loading" not in result.stderr  # nltk.download was not attempted
    splitter, both, none = result.stdout.strip().splitlines()[-3:]
    assert both == "[1.0]" and none == "[0.0]"
    if splitter == "regex":
        assert result.stderr.count("punkt_tab' data is not installed") == 1
    else:
        assert splitter == "punkt"


def test_regex_sentence_fallback_matches_lm_eval_splitter():
    if rewards.sentence_splitter() != "regex":
        pytest.skip("NLTK punkt data is installed; the fallback is not in use")
    util = rewards.instructions_util
    text = "Dr. Smith arrived at 3.30 p.m. today. He was late! Was he? Yes."
    assert util.count_sentences(text) == len(util.split_into_sentences(text)) == 4


def test_language_detection_is_deterministic():
    import langdetect

    assert langdetect.DetectorFactory.seed == 0
    # Short capitalised text is where langdetect's sampling decides; seeded, every call agrees.
    texts = ["BEES MAKE HONEY.", "P.S. I LOVE BEES.", "the moon is bright", "HALLO WELT"]
    ids = ["change_case:english_capital"]
    first = [call(ifeval_strict_reward, text, ids, [{}]) for text in texts]
    for _ in range(5):
        assert [call(ifeval_strict_reward, text, ids, [{}]) for text in texts] == first
