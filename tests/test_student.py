"""The cached student, greedy IFEval evaluation, expert log-probabilities and length distances."""

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_uniapl.demo import student  # noqa: E402
from trl_uniapl.ifeval import task  # noqa: E402
from trl_uniapl.ifeval.evaluation import (  # noqa: E402
    evaluate_ifeval,
    expert_logprob,
    kl_to_reference,
    length_wasserstein,
)
from trl_uniapl.ifeval.rewards import prompt_text  # noqa: E402

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    path = student.build_student(cache_dir=cache, fast=True, show_progress=False)
    return cache, path


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_student):
    _, path = tiny_student
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_build_student_saves_a_small_model(tiny_student):
    cache, path = tiny_student
    path = Path(path)
    assert path.parent == cache and path.name.startswith("student-v1-")
    settings = json.loads((path / student.SETTINGS_FILE).read_text())
    assert settings["hidden_size"] == 32 and settings["task_version"] == task.TASK_VERSION
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_build_student_uses_cache_and_rebuilds_when_missing(tiny_student, monkeypatch):
    cache, path = tiny_student
    weights = Path(path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(student, "build_tiny_model", fail)
        assert student.build_student(cache_dir=cache, fast=True, show_progress=False) == path
    assert weights.stat().st_mtime_ns == stamp

    weights.unlink()
    assert student.build_student(cache_dir=cache, fast=True, show_progress=False) == path
    assert weights.is_file()
    AutoModelForCausalLM.from_pretrained(path)


def test_build_student_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_UNIAPL_CACHE", str(tmp_path / "env-cache"))
    assert student.default_cache_dir() == tmp_path / "env-cache"
    path = student.build_student(fast=True, seed=1, show_progress=False)
    assert Path(path).parent == tmp_path / "env-cache"
    other = student.build_student(cache_dir=tmp_path / "explicit", fast=True, seed=2, show_progress=False)
    assert Path(other).parent == tmp_path / "explicit" and Path(other).name != Path(path).name


def test_evaluate_ifeval_on_tiny_student(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = task.make_splits(seed=0, num_demonstrations=1, num_preference=1, num_eval=6)["eval"]
    results = evaluate_ifeval(model, tokenizer, rows, max_new_tokens=16, batch_size=4, show_progress=False)
    for metric in METRICS:
        assert 0.0 <= results[metric] <= 1.0
        assert 0.0 <= results["ifeval_only"][metric] <= 1.0
    assert len(results["responses"]) == len(results["response_lengths"]) == 6
    assert all(0 <= length <= 16 for length in results["response_lengths"])
    assert 0.0 <= results["topic_accuracy"] <= 1.0
    assert 0.0 <= results["unrequested_effect_rate_mean"] <= 1.0
    assert all(rate is None or 0.0 <= rate <= 1.0 for rate in results["unrequested_effect_rate"].values())
    assert results["length_wasserstein_to_expert"] >= 0.0
    assert set(results["prompt_level_strict_acc_by_group"]) == {"unseen_topic", "unseen_combination"}
    # Greedy generation is deterministic and independent of the batch size (left padding).
    again = evaluate_ifeval(model, tokenizer, rows, max_new_tokens=16, batch_size=6, show_progress=False)
    assert again["responses"] == results["responses"]


def test_evaluate_ifeval_accepts_plain_ifeval_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [
        {"prompt": "Write a haiku.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"prompt": "Say hi.", "instruction_id_list": ["startend:quotation"], "kwargs": ['{"unused": null}']},
    ]
    results = evaluate_ifeval(model, tokenizer, rows, max_new_tokens=8, show_progress=False)
    assert results["topic_accuracy"] is None
    assert results["prompt_level_strict_acc"] == results["ifeval_only"]["prompt_level_strict_acc"]
    assert results["unrequested_effect_rate"]["detectable_format:title"] is not None


def test_expert_logprob_matches_unbatched_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = task.make_splits(seed=0, num_demonstrations=5, num_preference=1, num_eval=1)["demonstrations"]
    prompts, completions = rows["prompt"], rows["completion"]
    batched = expert_logprob(model, tokenizer, prompts, completions, batch_size=5)
    single = expert_logprob(model, tokenizer, prompts, completions, batch_size=1)
    assert batched == pytest.approx(single, abs=1e-4)
    # By hand, for the first row.
    prompt_ids = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions[0][0]["content"], add_special_tokens=False)["input_ids"]
    completion_ids += [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    logprobs = torch.log_softmax(logits, -1)
    expected = sum(logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(completion_ids)) / len(
        completion_ids
    )
    assert batched[0] == pytest.approx(expected, abs=1e-4)
    assert all(value < 0 and math.isfinite(value) for value in batched)
    plain = expert_logprob(model, tokenizer, [prompt_text(p) for p in prompts], [c[0]["content"] for c in completions])
    assert plain == pytest.approx(batched, abs=1e-4)


def test_kl_to_reference_is_zero_to_itself_and_matches_a_hand_computation(model_and_tokenizer):
    import copy

    model, tokenizer = model_and_tokenizer
    rows = task.make_splits(seed=0, num_demonstrations=3, num_preference=1, num_eval=1)["demonstrations"]
    prompts, completions = rows["prompt"], rows["completion"]
    assert kl_to_reference(model, model, tokenizer, prompts, completions) == pytest.approx(0.0, abs=1e-7)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for param in moved.parameters():
            param.add_(0.05 * torch.randn_like(param))
    moved.train()
    batched = kl_to_reference(moved, model, tokenizer, prompts, completions, batch_size=3)
    assert moved.training, "the model's training mode was not restored"
    # By hand: the exact next-token KL at every completion position (EOS included), averaged over all positions.
    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion[0]["content"], add_special_tokens=False)["input_ids"]
        completion_ids += [tokenizer.eos_token_id]
        with torch.no_grad():
            ids = torch.tensor([prompt_ids + completion_ids])
            p, q = torch.log_softmax(moved(ids).logits[0], -1), torch.log_softmax(model(ids).logits[0], -1)
        for i in range(len(completion_ids)):
            position = len(prompt_ids) - 1 + i
            total += (p[position].exp() * (p[position] - q[position])).sum().item()
            count += 1
    assert batched == pytest.approx(total / count, rel=1e-4) and batched > 0


def test_length_wasserstein():
    assert length_wasserstein([1, 2, 3], [1, 2, 3]) == 0.0
    assert length_wasserstein([1, 2, 3], [6, 7, 8]) == pytest.approx(5.0)
    assert length_wasserstein([0], [1, 3]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        length_wasserstein([], [1])
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        a = [rng.randint(0, 60) for _ in range(rng.randint(1, 30))]
        b = [rng.gauss(30, 10) for _ in range(rng.randint(1, 30))]
        assert length_wasserstein(a, b) == pytest.approx(stats.wasserstein_distance(a, b))


def test_build_student_runs_at_the_build_thread_count_and_restores_the_callers(tmp_path, monkeypatch):
    # A student built on 1 thread differs in its last bits from one built on 2 (float reductions), and SFT amplifies
    # that: every build runs at cache.BUILD_THREADS, whatever the caller set.
    from trl_uniapl.demo import cache

    seen = []
    warm_up = student._warm_up

    def recording_warm_up(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return warm_up(*args, **kwargs)

    monkeypatch.setattr(student, "_warm_up", recording_warm_up)
    caller_threads = torch.get_num_threads()
    other = 1 if cache.BUILD_THREADS != 1 else 3
    torch.set_num_threads(other)
    try:
        student.build_student(cache_dir=tmp_path, fast=True, show_progress=False)
        assert seen == [cache.BUILD_THREADS]
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(caller_threads)
