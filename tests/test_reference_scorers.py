"""Fixed, reference-conditioned scorers: n-gram F1, the frozen sequence classifier, spec loading and the embedded
task's learned scorer (built tiny, in a temporary cache)."""

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from trl_uniapl import reference_scorers  # noqa: E402
from trl_uniapl.demo import reference_scorer as demo_scorer  # noqa: E402
from trl_uniapl.reference_scorers import (  # noqa: E402
    DEFAULT_REFERENCE_TEMPLATE,
    NGramF1Scorer,
    ReferenceScorer,
    SequenceClassifierScorer,
    describe_scorer,
    is_model_spec,
    load_reference_scorer,
    message_text,
    ngram_f1,
    ngram_f1_score,
    ngram_f1_scorer,
)

TINY_BUILD = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_train_prompts=24,
    num_heldout_prompts=12,
    num_steps=3,
    batch_size=8,
    max_length=384,
)

RECORDED: list[dict] = []
NOT_CALLABLE = 3


def recording_scorer(prompts, references, completions, **kwargs):
    """A scorer a dotted path can name: records what it receives."""
    RECORDED.append({"prompts": prompts, "references": references, "completions": completions, "kwargs": kwargs})
    return [float(i) for i in range(len(prompts))]


def scorer_without_kwargs(prompts, references, completions):
    return [0.0] * len(prompts)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------------------------------------------------
# Text and n-gram F1
# --------------------------------------------------------------------------------------------------------------------


def test_message_text_formats():
    assert message_text("plain") == "plain"
    assert message_text(None) == ""
    assert message_text([{"role": "system", "content": "be brief"}, *user("hi")]) == "be brief\nhi"
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}
    ]
    assert message_text(parts) == "ab"
    with pytest.raises(ValueError, match="list of"):
        message_text([1, 2])


@pytest.mark.parametrize(
    ("candidate", "reference", "n", "level", "expected"),
    [
        ("abcd", "abce", 3, "char", 1 / 2),  # trigrams {abc, bcd} vs {abc, bce}: P = R = 1/2
        ("aaaa", "aaa", 3, "char", 2 / 3),  # multiset: 2 × "aaa" vs 1 × "aaa": P = 1/2, R = 1 (sets: 1.0)
        ("ab", "abc", 2, "char", 2 / 3),  # {ab} vs {ab, bc}: P = 1, R = 1/2
        ("ABC", "abc", 3, "char", 0.0),  # case-sensitive
        ("the cat the dog", "the cat sat", 1, "word", 4 / 7),  # P = 2/4, R = 2/3
        ("a b c d", "a b c e", 2, "word", 2 / 3),  # bigrams {ab, bc, cd} vs {ab, bc, ce}
        ("x y", "x y", 3, "word", 0.0),  # fewer words than n: no n-gram
    ],
)
def test_ngram_f1_hand_computed(candidate, reference, n, level, expected):
    assert ngram_f1_score(candidate, reference, n=n, level=level) == pytest.approx(expected, abs=1e-12)
    assert ngram_f1(n=n, level=level)(["p"], [reference], [candidate]) == [pytest.approx(expected, abs=1e-12)]


def test_ngram_f1_identical_disjoint_and_empty():
    text = "The lead sentence, and another one."
    for level in ("char", "word"):
        scorer = ngram_f1(n=2, level=level)
        assert scorer(["p"], [text], [text]) == [1.0]
        assert scorer(["p"], ["aaaa bbbb cccc"], ["xxxx yyyy zzzz"]) == [0.0]
        assert scorer(["p"], [""], [text]) == [0.0] and scorer(["p"], [text], [""]) == [0.0]
    assert ngram_f1_scorer(["p"], [text], [text]) == [1.0]


def test_ngram_f1_conversational_equals_plain():
    prompts, references, completions = ["a prompt"], ["the sky is blue today"], ["the sky was blue"]
    plain = ngram_f1_scorer(prompts, references, completions)
    chat = ngram_f1_scorer([user("a prompt")], [assistant(references[0])], [assistant(completions[0])])
    assert chat == plain and 0.0 < plain[0] < 1.0


def test_ngram_f1_arguments_are_checked():
    with pytest.raises(ValueError, match="at least 1"):
        ngram_f1(n=0)
    with pytest.raises(ValueError, match="'char' or 'word'"):
        ngram_f1(level="byte")
    with pytest.raises(ValueError, match="2 prompts, 1 references and 2 completions"):
        ngram_f1_scorer(["a", "b"], ["r"], ["c", "d"])
    assert isinstance(ngram_f1_scorer, ReferenceScorer) and isinstance(ngram_f1_scorer, NGramF1Scorer)


def test_each_row_is_scored_against_its_own_reference():
    references = ["the sky is blue", "a cat runs fast", "green apples here"]
    completions = ["a cat runs slow", "green apples there", "the sky is blue"]
    scores = ngram_f1_scorer(["p"] * 3, references, completions)
    assert scores == [ngram_f1_score(c, r) for c, r in zip(completions, references)]
    shuffled = ngram_f1_scorer(["p"] * 3, references[1:] + references[:1], completions)
    assert shuffled[2] == 1.0 and scores[2] < 1.0 and shuffled != scores

    RECORDED.clear()
    scorer = load_reference_scorer(f"{__name__}.recording_scorer")
    assert scorer is recording_scorer
    prompts = [user(f"prompt {i}") for i in range(3)]
    assert scorer(prompts, [assistant(r) for r in references], [assistant(c) for c in completions], topic=["x"] * 3)
    (call,) = RECORDED
    assert [message_text(r) for r in call["references"]] == references
    assert [message_text(p) for p in call["prompts"]] == ["prompt 0", "prompt 1", "prompt 2"]
    assert call["kwargs"] == {"topic": ["x"] * 3}


# --------------------------------------------------------------------------------------------------------------------
# load_reference_scorer and describe_scorer
# --------------------------------------------------------------------------------------------------------------------


def test_load_reference_scorer_builtin_and_callable():
    assert load_reference_scorer("ngram_f1") is ngram_f1_scorer
    assert load_reference_scorer(recording_scorer) is recording_scorer
    assert load_reference_scorer("trl_uniapl.reference_scorers.ngram_f1_scorer") is ngram_f1_scorer


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_xyz.module.fn", "no module 'no_such_package_xyz.module'"),
        ("trl_uniapl.reference_scorers.no_such_scorer", "has no attribute 'no_such_scorer'"),
        (f"{__name__}.NOT_CALLABLE", "is a int, not a callable"),
        (f"{__name__}.scorer_without_kwargs", "takes no \\*\\*kwargs"),
        ("trl_uniapl.reference_scorers.message_text", "cannot be called as scorer"),
        ("./no/such/scorer-dir", "Reference scorer directory not found: './no/such/scorer-dir'"),
    ],
)
def test_load_reference_scorer_errors(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        load_reference_scorer(spec)
    if "." in spec and "/" not in spec:
        assert repr(spec) in str(error.value)


def test_load_reference_scorer_rejects_a_folder_without_model_and_misplaced_options(tmp_path):
    with pytest.raises(ValueError, match="has no config.json: it is not a saved model"):
        load_reference_scorer(str(tmp_path))
    with pytest.raises(ValueError, match="template only apply to a model reference scorer"):
        load_reference_scorer("ngram_f1", template="{prompt}{reference}{completion}")
    with pytest.raises(ValueError, match="Unusable reference scorer spec 3"):
        load_reference_scorer(3)


def test_is_model_spec(tmp_path):
    assert is_model_spec(str(tmp_path)) and is_model_spec(tmp_path) and is_model_spec("org/some-model")
    assert is_model_spec("./no/such/dir")  # meant as a model: load_reference_scorer says it is missing
    for spec in ("ngram_f1", "trl_uniapl.reference_scorers.ngram_f1_scorer", recording_scorer, 3, ""):
        assert not is_model_spec(spec)


def test_describe_scorer():
    assert describe_scorer(ngram_f1_scorer) == {"kind": "ngram_f1", "n": 3, "level": "char"}
    assert describe_scorer(recording_scorer) == {"kind": "callable", "name": f"{__name__}.recording_scorer"}
    json.dumps(describe_scorer(lambda prompts, references, completions, **kwargs: []))
    with pytest.raises(ValueError, match="not callable"):
        describe_scorer(3)


# --------------------------------------------------------------------------------------------------------------------
# SequenceClassifierScorer
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_scorer_path(tmp_path_factory, tiny_model_path):
    cache = tmp_path_factory.mktemp("scorer-cache")
    path = demo_scorer.build_reference_scorer(cache, student=tiny_model_path, progress=False, **TINY_BUILD)
    return cache, path


def test_template_validation_names_the_missing_field(tiny_scorer_path):
    _, path = tiny_scorer_path
    with pytest.raises(ValueError, match=r"no \{reference\} field") as error:
        SequenceClassifierScorer(path, template="{prompt} => {completion}")
    assert repr(DEFAULT_REFERENCE_TEMPLATE) in str(error.value)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\]"):
        SequenceClassifierScorer(path, template="{prompt}{reference}{completion}{answer}")
    with pytest.raises(ValueError, match="not a valid format string"):
        SequenceClassifierScorer(path, template="{prompt}{reference}{completion}{")


def test_sequence_classifier_scorer_is_fixed_and_reads_the_reference(tiny_scorer_path):
    _, path = tiny_scorer_path
    scorer = SequenceClassifierScorer(path)
    assert not scorer.model.training
    assert not [name for name, p in scorer.model.named_parameters() if p.requires_grad]
    before = {name: p.detach().clone() for name, p in scorer.model.named_parameters()}

    prompts = [user("Write a short note about cats. Use no commas."), "Tell me about tea."]
    references = [assistant("Cats are small, and they purr."), "Tea is a drink"]
    completions = [assistant("Cats purr"), "Tea is hot"]
    scores = scorer(prompts, references, completions)
    assert len(scores) == 2 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    other = scorer(prompts, [assistant("Dogs bark at the moon tonight."), "Rain falls on the river"], completions)
    assert other[0] != scores[0] and other[1] != scores[1]
    assert all(torch.equal(before[name], p) for name, p in scorer.model.named_parameters())
    # right padding: a row's score does not depend on the other rows of its batch
    alone = scorer(prompts[1:], references[1:], completions[1:])
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)
    assert describe_scorer(scorer) == {
        "kind": "sequence_classifier",
        "name_or_path": str(path),
        "template": DEFAULT_REFERENCE_TEMPLATE,
        "max_length": 1024,
    }
    assert load_reference_scorer(str(path)).describe() == scorer.describe()


def test_sequence_classifier_scorer_truncates_on_the_left(tiny_scorer_path):
    _, path = tiny_scorer_path
    scorer = SequenceClassifierScorer(path, max_length=8)
    texts = scorer.render(["a long prompt " * 20], ["reference"], ["the candidate"])
    batch = scorer._encode(texts)
    full = scorer.tokenizer(texts[0])["input_ids"]
    assert len(full) > 8 and batch["input_ids"][0].tolist() == full[-8:]  # the first tokens are dropped
    assert scorer.tokenizer.truncation_side == "right"  # restored


def test_sequence_classifier_scorer_pads_with_eos_when_no_pad_token(tiny_scorer_path):
    _, path = tiny_scorer_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer = SequenceClassifierScorer(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert not any(p.requires_grad for p in model.parameters())
    assert len(scorer(["a", "bb bb"], ["r", "rr"], ["c", "cc cc cc"])) == 2


def test_sequence_classifier_scorer_refuses_an_untrained_head(tiny_model_path):
    with pytest.raises(ValueError, match=r"not a trained sequence classifier.*score\.weight"):
        SequenceClassifierScorer(tiny_model_path)
    scorer = SequenceClassifierScorer(tiny_model_path, allow_untrained_head=True)
    assert len(scorer(["p"], ["r"], ["c"])) == 1


# --------------------------------------------------------------------------------------------------------------------
# The embedded task's learned scorer
# --------------------------------------------------------------------------------------------------------------------


def test_ranking_accuracy_counts_pairs():
    group = demo_scorer.CandidateGroup(
        prompt=user("p"),
        reference="ref",
        positives=[("superset", "a long answer here"), ("same_topic", "mid")],
        negatives=[("plain", "x"), ("subset", "medium answer")],
    )

    def by_length(prompts, references, completions, **kwargs):
        return [float(len(message_text(c))) for c in completions]

    result = demo_scorer.ranking_accuracy(by_length, [group])
    # pairs: long>x, long>medium, mid>x, mid<medium: 3 of 4
    assert result["ranking_accuracy"] == 0.75 and result["num_pairs"] == 4 and result["num_prompts"] == 1
    assert result["by_negative_kind"]["plain"] == {"ranking_accuracy": 1.0, "num_pairs": 2}
    assert result["by_negative_kind"]["subset"] == {"ranking_accuracy": 0.5, "num_pairs": 2}


def test_candidate_groups_are_labelled_by_the_checkers():
    from trl_uniapl.ifeval import task
    from trl_uniapl.ifeval.rewards import check_response

    groups = demo_scorer.candidate_groups(6, seed=3)
    assert groups and all(group.positives and group.negatives for group in groups)
    for group in groups:
        row = next(row for row in task.generate_rows(6, seed=3) if row["prompt"] == group.prompt)
        assert group.reference == task.teacher_response(row)

        def follows(text, row=row):
            return check_response(text, row["instruction_id_list"], row["kwargs"], row["topic_keywords"]).follow_all

        assert all(follows(text) for _, text in group.positives)
        assert not any(follows(text) for _, text in group.negatives)
        assert all(text != group.reference for _, text in (*group.positives, *group.negatives))
        assert {kind for kind, _ in (*group.positives, *group.negatives)} <= set(demo_scorer.CANDIDATE_KINDS)
    assert groups == demo_scorer.candidate_groups(6, seed=3)  # deterministic


def test_build_reference_scorer_writes_metrics_and_is_cached(tiny_scorer_path, tiny_model_path, monkeypatch):
    cache, path = tiny_scorer_path
    assert isinstance(path, Path) and path.parent == cache and path.name.startswith("reference-scorer-v1-")
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "staging directory left behind"
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics == demo_scorer.load_metrics(path)
    for key in ("heldout_ranking_accuracy", "heldout_ranking_accuracy_ngram_f1"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    assert metrics["heldout"]["learned"]["num_pairs"] > 0
    assert metrics["heldout"]["ngram_f1"]["num_pairs"] == metrics["heldout"]["learned"]["num_pairs"]
    assert metrics["settings"]["num_steps"] == TINY_BUILD["num_steps"]

    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained although the cache is valid")

    monkeypatch.setattr(demo_scorer, "_train_scorer", fail)
    monkeypatch.setattr(demo_scorer, "candidate_groups", fail)
    again = demo_scorer.build_reference_scorer(cache, student=tiny_model_path, progress=False, **TINY_BUILD)
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="retrained"):  # other settings: another folder, built anew
        demo_scorer.build_reference_scorer(
            cache, student=tiny_model_path, progress=False, **{**TINY_BUILD, "num_steps": 4}
        )


def test_reference_scorers_module_imports_without_the_ifeval_extra():
    source = Path(reference_scorers.__file__).read_text()
    assert "ifeval" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))
