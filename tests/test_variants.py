"""The paper's published variants of the adversarial term: a FIXED reference-conditioned scorer instead of the online
discriminator, and the online discriminator frozen after N updates."""

import json
import math
import os

import pytest
import torch
from conftest import build_uniapl

from trl_uniapl import UniAPLConfig
from trl_uniapl.adversarial_term import REFERENCE_SCORER_FILE

RECORDED = []


def recording_scorer(prompts, references, completions, **kwargs):
    """Scores by length difference to the reference (varies within a group) and records what it was given."""
    RECORDED.append((list(prompts), list(references), list(completions)))
    return [-abs(len(str(c)) - len(str(r))) / 10.0 for c, r in zip(completions, references)]


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_callable_scorer_gets_each_rows_own_reference_and_preference_rows_are_unscored(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    RECORDED.clear()
    trainer = build_uniapl(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=2,
                           reference_scorer="test_variants.recording_scorer", demonstration_ratio=0.5)  # fmt: skip
    assert trainer.discriminator is None and trainer.adversarial.reference_scorer is recording_scorer
    advantages = []
    original = trainer.adversarial.advantages

    def recorded(mode):
        values = original(mode)
        advantages.append((list(trainer._batch.is_demonstration), values.clone()))
        return values

    trainer.adversarial.advantages = recorded
    trainer.train()
    expert_of = dict(zip(demonstration_dataset["prompt"], demonstration_dataset["completion"]))
    assert len(RECORDED) == 2
    for prompts, references, completions in RECORDED:
        assert prompts and len(prompts) == len(references) == len(completions)
        assert all(expert_of[prompt] == reference for prompt, reference in zip(prompts, references))
    for is_demonstration, values in advantages:
        assert any(is_demonstration) and not all(is_demonstration)
        preference_rows = [row for row, is_demo in enumerate(is_demonstration) if not is_demo]
        assert torch.all(values[preference_rows] == 0)
        assert values[[row for row, is_demo in enumerate(is_demonstration) if is_demo]].abs().sum() > 0
    logs = step_logs(trainer)
    rows = trainer.args.per_device_train_batch_size
    assert all(entry["reference/unscored"] == rows - sum(advantages[0][0]) for entry in logs)
    assert all(math.isfinite(entry["reference/score_mean"]) and "discriminator/loss" not in entry for entry in logs)


def test_a_model_scorer_stays_fixed_and_is_recorded_in_checkpoints(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer_path = tmp_path / "scorer"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(scorer_path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(scorer_path)
    trainer = build_uniapl(tmp_path / "run", tiny_model_path, preference_dataset, demonstration_dataset, max_steps=2,
                           reference_scorer=str(scorer_path), save_strategy="steps", save_steps=1)  # fmt: skip
    model = trainer.adversarial.reference_scorer.model
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert not any(param.requires_grad for param in model.parameters())
    policy_parameters = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert not policy_parameters & {id(p) for p in model.parameters()}
    trainer.train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
    assert all("reference/score_std" in entry for entry in step_logs(trainer))
    record = json.loads((tmp_path / "run" / "checkpoint-2" / REFERENCE_SCORER_FILE).read_text())
    assert record["reference_scorer"]["name_or_path"] == str(scorer_path)
    resumed = build_uniapl(tmp_path / "run", tiny_model_path, preference_dataset, demonstration_dataset, max_steps=3,
                           reference_scorer=str(scorer_path))  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 3


def test_ngram_scorer_by_name(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    trainer = build_uniapl(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=1,
                           reference_scorer="ngram_f1")  # fmt: skip
    trainer.train()
    entry = step_logs(trainer)[0]
    assert 0.0 <= entry["reference/score_mean"] <= 1.0 and entry["adversarial/coef"] == trainer.args.adversarial_coef


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reference_scorer": "ngram_f1", "adversarial_coef_mode": "lagrangian"}, "adversarial_coef_mode='fixed'"),
        ({"reference_scorer": "ngram_f1", "demonstration_ratio": 0.0}, "rolls out none"),
    ],
)
def test_reference_scorer_settings_that_cannot_work_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        UniAPLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)


def test_a_scorer_with_the_adversarial_term_off_is_refused(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    from conftest import length_reward, uniapl_args

    from trl_uniapl import UniAPLTrainer

    with pytest.raises(ValueError, match="never be called"):
        UniAPLTrainer(model=tiny_model_path, reward_funcs=length_reward,
                      args=uniapl_args(tmp_path, adversarial_coef=0.0), train_dataset=preference_dataset,
                      demonstration_dataset=demonstration_dataset, reference_scorer=recording_scorer)  # fmt: skip


# ---- the online discriminator frozen after N updates
def test_frozen_discriminator_stops_at_n_updates_and_stays_frozen_after_resume(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    settings = dict(max_steps=4, discriminator_freeze_after_updates=2, save_strategy="steps", save_steps=2)
    trainer = build_uniapl(tmp_path / "run", tiny_model_path, preference_dataset, demonstration_dataset, **settings)
    snapshots = []

    class Snapshot:
        def __call__(self, *args, **kwargs):
            pass

    original = trainer.adversarial.advantages

    def recorded(mode):
        values = original(mode)
        snapshots.append([p.detach().clone() for p in trainer.discriminator.trainable_parameters])
        return values

    trainer.adversarial.advantages = recorded
    trainer.train()
    assert trainer.adversarial.state["num_updates"] == 2 and trainer.adversarial.frozen
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # update 2 moved it
    for later in snapshots[2:]:  # then it only scores
        assert all(torch.equal(a, b) for a, b in zip(snapshots[1], later))
    logs = step_logs(trainer)
    assert [entry["discriminator/frozen"] for entry in logs] == [0.0, 1.0, 1.0, 1.0]
    assert all("discriminator/acc_real" in entry for entry in logs)  # still scoring
    assert sum("discriminator/loss" in entry for entry in logs) == 2

    resumed = build_uniapl(tmp_path / "resumed", tiny_model_path, preference_dataset, demonstration_dataset,
                           **{**settings, "max_steps": 5})  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.adversarial.state["num_updates"] == 2 and resumed.adversarial.frozen
    for a, b in zip(trainer.discriminator.trainable_parameters, resumed.discriminator.trainable_parameters):
        torch.testing.assert_close(a, b)
    assert os.path.isdir(tmp_path / "resumed")
