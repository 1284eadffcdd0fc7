"""Faults during training: a discriminator that returns NaN/inf, reward functions that raise or return None, and a
discriminator that collapses. Each is injected into a short CPU run."""

import logging
import math

import pytest
import torch
from conftest import length_reward, uniapl_args

from trl_uniapl import UniAPLTrainer

# The package logger: the warnings come from its modules, and a benchmark run in the same process may have
# raised its level (benchmarks.common.quiet_libraries), which caplog.at_level resets for the test.
PACKAGE_LOGGER = "trl_uniapl"


def corrupt_discriminator(trainer, value: float | None = None, constant: float | None = None):
    """Make the discriminator's logits `value` (NaN/inf) or a `constant`, keeping them connected to its weights."""
    model = trainer.discriminator.model
    forward = model.forward

    def corrupted(*args, **kwargs):
        output = forward(*args, **kwargs)
        if value is not None:
            output.logits = output.logits * 0.0 + value
        else:
            output.logits = output.logits * 0.0 + constant
        return output

    model.forward = corrupted


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(
    "value, overrides",
    [(float("nan"), {}), (float("inf"), {"adversarial_reward_clip": None})],
    ids=["nan", "inf-unclipped"],
)
def test_nonfinite_discriminator_is_contained(
    value, overrides, tiny_model_path, preference_dataset, demonstration_dataset, tmp_path, caplog
):
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=2, **overrides),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    corrupt_discriminator(trainer, value=value)
    discriminator_before = snapshot(trainer.discriminator.model)
    policy_before = snapshot(trainer.model)
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        trainer.train()

    assert trainer.state.global_step == 2, "training did not continue"
    # The update is skipped on every step, with a warning and a counter; the discriminator keeps its weights.
    assert trainer.adversarial.state["skipped_updates"] == 2
    assert "Discriminator update skipped" in caplog.text
    logs = step_logs(trainer)
    assert [entry["discriminator/skipped_updates"] for entry in logs] == [1.0, 2.0]
    for name, param in trainer.discriminator.model.named_parameters():
        torch.testing.assert_close(param, discriminator_before[name], msg=name)
    # Non-finite scores leave their rows unscored (no adversarial advantage) rather than poisoning the advantages, and
    # are counted. Every row is non-finite here, so nothing is scored.
    assert "non-finite scores" in caplog.text
    for entry in logs:
        assert entry["adversarial/unscored"] == trainer.args.generation_batch_size
        assert entry["rewards/adversarial/mean"] == 0.0
        for key in ("loss", "reward", "reward_std", "rewards/length_reward/mean", "sft/loss"):
            assert math.isfinite(entry[key]), (key, entry[key])
    # The policy trained and is finite.
    changed = 0
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name
        changed += not torch.equal(param, policy_before[name])
    assert changed > 0


def test_transient_fault_recovers(tiny_model_path, preference_dataset, demonstration_dataset, tmp_path):
    """A NaN at one step only: that update is skipped, the next ones are applied."""
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=3),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    model = trainer.discriminator.model
    forward = model.forward

    def nan_at_second_step(*args, **kwargs):
        output = forward(*args, **kwargs)
        if trainer.state.global_step == 1:
            output.logits = output.logits * float("nan")
        return output

    model.forward = nan_at_second_step
    before = snapshot(model)
    trainer.train()
    logs = step_logs(trainer)
    assert [entry["discriminator/skipped_updates"] for entry in logs] == [0.0, 1.0, 1.0]
    assert trainer.adversarial.state["num_updates"] == 3
    assert any(not torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert math.isfinite(logs[-1]["discriminator/loss"])


def test_raising_reward_function_is_named(tiny_model_path, preference_dataset, demonstration_dataset, tmp_path):
    def flaky_judge(prompts, completions, **kwargs):
        raise KeyError("score")

    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=[length_reward, flaky_judge],
        args=uniapl_args(tmp_path, max_steps=1),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    # The user's exception type is kept (as GRPOTrainer raises it); a note names the function and the rows.
    with pytest.raises(KeyError, match="score") as error:
        trainer.train()
    notes = "\n".join(getattr(error.value, "__notes__", []))
    assert "flaky_judge" in notes and "first prompts" in notes and "Tell me about" in notes
    assert trainer.state.global_step == 0


def test_reward_returning_none_for_some_rows(tiny_model_path, preference_dataset, demonstration_dataset, tmp_path):
    """None means "not applicable" (GRPO: ignored in the weighted sum and in the per-function mean)."""
    scored = []

    def topic_reward(completions, topic, **kwargs):
        # Only preference rows have a topic; demonstration rows get None.
        rewards = [None if t is None else float(len(c)) / 50.0 for c, t in zip(completions, topic)]
        scored.append([r for r in rewards if r is not None])
        return rewards

    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=[topic_reward],
        args=uniapl_args(tmp_path, max_steps=2),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == len(scored) == 2
    assert all(0 < len(rewards) < trainer.args.generation_batch_size for rewards in scored)
    for entry in logs:
        for key in ("loss", "reward", "rewards/topic_reward/mean", "rewards/adversarial/mean"):
            assert math.isfinite(entry[key]), (key, entry[key])
    # The logged mean is over the rows that were scored (nanmean), as in GRPO.
    for entry, rewards in zip(logs, scored):
        assert entry["rewards/topic_reward/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)


def test_none_rewards_match_grpo(tiny_model_path, preference_dataset, tmp_path):
    """Without demonstrations UniAPL is GRPO: the same None-returning reward gives the same run."""
    from trl import GRPOConfig, GRPOTrainer

    def half_none(completions, **kwargs):
        return [None if i % 2 else float(len(c)) / 50.0 for i, c in enumerate(completions)]

    settings = dict(
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", per_device_train_batch_size=8,
        num_generations=4, max_completion_length=12, max_steps=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    logs = []
    for cls in (GRPOTrainer, UniAPLTrainer):
        trainer = cls(
            model=tiny_model_path,
            reward_funcs=half_none,
            args=GRPOConfig(output_dir=str(tmp_path / cls.__name__), **settings),
            train_dataset=preference_dataset,
        )
        trainer.train()
        logs.append(step_logs(trainer))
    assert len(logs[0]) == len(logs[1]) == 2
    for grpo, uniapl in zip(*logs):
        for key in ("loss", "reward", "reward_std", "rewards/half_none/mean"):
            assert uniapl[key] == pytest.approx(grpo[key], rel=1e-6), key


def test_collapse_is_detected_and_logged(tiny_model_path, preference_dataset, demonstration_dataset, tmp_path, caplog):
    """A discriminator that says "expert" to everything is pinned at balanced accuracy 0.5: collapse."""
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=2, discriminator_collapse_patience=2),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    corrupt_discriminator(trainer, constant=3.0)
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        trainer.train()
    logs = step_logs(trainer)
    assert [entry["discriminator/collapsed"] for entry in logs] == [0.0, 1.0]
    assert [(entry["discriminator/acc_real"], entry["discriminator/acc_fake"]) for entry in logs] == [(1.0, 0.0)] * 2
    assert "Discriminator collapse" in caplog.text and "cannot tell expert from policy" in caplog.text
