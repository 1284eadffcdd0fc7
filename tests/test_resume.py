"""Exact resume: a run resumed from checkpoint-k logs what the uninterrupted run logs for steps k+1..N, with the
discriminator, λ and the data streams restored; an interrupted run never leaves a checkpoint that the next run would
pick up half-written."""

import json
import math
import os

import pytest
import torch
from conftest import WORDS, length_reward, make_completions, make_prompts, uniapl_args
from datasets import Dataset
from transformers import TrainerCallback

from trl_uniapl import UniAPLTrainer
from trl_uniapl.adversarial_term import DISCRIMINATOR_DIR
from trl_uniapl.trainer import COMPLETE_MARKER, last_complete_checkpoint

MAX_STEPS, SAVE_STEPS = 4, 2
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def build(model_path, output_dir, seen=None, fail_at_step=None, **overrides):
    """A UniAPL trainer whose reward function records the prompts it scores (and can fail at a given step)."""
    preference = Dataset.from_dict({"prompt": make_prompts(16), "topic": [WORDS[i % 5] for i in range(16)]})
    demonstrations = Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})
    seen = [] if seen is None else seen

    def recorded_reward(prompts, completions, trainer_state, **kwargs):
        step = trainer_state.global_step + 1  # the optimizer step these completions train
        if fail_at_step is not None and step == fail_at_step:
            raise ConnectionError("the reward server went away")
        seen.append((step, sorted(prompts)))
        return length_reward(completions)

    settings = dict(
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        adversarial_coef_mode="lagrangian",
        adversarial_coef_lr=0.5,  # λ visibly moves at every step
    )
    settings.update(overrides)
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=recorded_reward,
        args=uniapl_args(output_dir, **settings),
        train_dataset=preference,
        demonstration_dataset=demonstrations,
    )
    return trainer, seen


def checkpoints(output_dir) -> list[str]:
    return sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))


def step_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def assert_same_logs(expected: dict, actual: dict, steps) -> None:
    for step in steps:
        mine, theirs = expected[step], actual[step]
        assert mine.keys() == theirs.keys(), (step, mine.keys() ^ theirs.keys())
        for key in mine.keys() - TIMING_KEYS:
            if isinstance(mine[key], float) and math.isnan(mine[key]):
                assert math.isnan(theirs[key]), (step, key)
            else:
                assert theirs[key] == pytest.approx(mine[key], rel=1e-5, abs=1e-7), (step, key, mine[key], theirs[key])


def assert_same_discriminator(first, second) -> None:
    for (name, a), (_, b) in zip(
        first.discriminator.model.named_parameters(), second.discriminator.model.named_parameters()
    ):
        torch.testing.assert_close(a, b, msg=f"discriminator parameter {name} differs")
    state_a = first.discriminator.optimizer.state_dict()["state"]
    state_b = second.discriminator.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state_a[key][name], state_b[key][name], msg=f"optimizer {name} of {key}")


def assert_same_policy(first, second) -> None:
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=f"policy parameter {name} differs")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer, seen = build(tiny_model_path, output_dir)
    trainer.train()
    return trainer, seen, output_dir


def test_checkpoint_holds_discriminator_state(uninterrupted):
    trainer, _, output_dir = uninterrupted
    checkpoint = os.path.join(output_dir, f"checkpoint-{SAVE_STEPS}")
    assert os.path.exists(os.path.join(checkpoint, COMPLETE_MARKER))
    with open(os.path.join(checkpoint, DISCRIMINATOR_DIR, "discriminator_state.json")) as f:
        state = json.load(f)
    logged = step_logs(trainer)[SAVE_STEPS]
    assert state["adversarial_coef"] != pytest.approx(trainer.args.adversarial_coef), "λ did not move: weak test"
    assert state["adversarial_coef"] == pytest.approx(logged["adversarial/coef"] + 0.0, abs=1.0)  # sanity
    assert state["num_updates"] == SAVE_STEPS and state["skipped_updates"] == 0
    assert last_complete_checkpoint(str(output_dir)).endswith(f"checkpoint-{MAX_STEPS}")


def test_resume_matches_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path):
    reference, reference_seen, output_dir = uninterrupted
    checkpoint = os.path.join(output_dir, f"checkpoint-{SAVE_STEPS}")
    trainer, seen = build(tiny_model_path, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=checkpoint)

    resumed_steps = range(SAVE_STEPS + 1, MAX_STEPS + 1)
    assert_same_logs(step_logs(reference), step_logs(trainer), resumed_steps)
    # The data streams: the resumed run scores exactly the prompts of steps k+1..N, no demonstration skipped/repeated.
    assert seen == [entry for entry in reference_seen if entry[0] > SAVE_STEPS]
    assert [entry[0] for entry in seen] == list(resumed_steps)
    # The discriminator (weights and AdamW moments), λ and the policy end where the uninterrupted run ends.
    assert trainer.adversarial.adversarial_coef == pytest.approx(reference.adversarial.adversarial_coef, rel=1e-9)
    assert trainer.adversarial.state == reference.adversarial.state
    assert_same_discriminator(reference, trainer)
    assert_same_policy(reference, trainer)


def test_resume_restores_discriminator_and_lambda(uninterrupted, tiny_model_path, tmp_path):
    """What `_load_optimizer_and_scheduler` restores is exactly what checkpoint-k holds."""
    from safetensors.torch import load_file

    _, _, output_dir = uninterrupted
    checkpoint = os.path.join(output_dir, f"checkpoint-{SAVE_STEPS}")
    trainer, _ = build(tiny_model_path, tmp_path / "reloaded")
    assert trainer.adversarial.adversarial_coef == pytest.approx(trainer.args.adversarial_coef)
    trainer.create_optimizer_and_scheduler(num_training_steps=MAX_STEPS)
    trainer._load_optimizer_and_scheduler(checkpoint)

    with open(os.path.join(checkpoint, DISCRIMINATOR_DIR, "discriminator_state.json")) as f:
        state = json.load(f)
    assert trainer.adversarial.adversarial_coef == state["adversarial_coef"] != trainer.args.adversarial_coef
    assert trainer.adversarial.state["num_updates"] == SAVE_STEPS
    assert trainer.adversarial.state["last_update_step"] == state["last_update_step"]
    # The default (shared) discriminator checkpoints its LoRA adapter and score head in peft's format.
    saved = load_file(os.path.join(checkpoint, DISCRIMINATOR_DIR, "adapter_model.safetensors"))
    loaded = trainer.discriminator.model.adapter_state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value, msg=name)
    optimizer_state = torch.load(os.path.join(checkpoint, DISCRIMINATOR_DIR, "discriminator_optimizer.pt"))
    loaded = trainer.discriminator.optimizer.state_dict()["state"]
    assert loaded.keys() == optimizer_state["state"].keys() and loaded
    for key, value in optimizer_state["state"].items():
        torch.testing.assert_close(loaded[key]["exp_avg"], value["exp_avg"])
        torch.testing.assert_close(loaded[key]["exp_avg_sq"], value["exp_avg_sq"])


def test_exception_mid_training_leaves_resumable_checkpoint(uninterrupted, tiny_model_path, tmp_path):
    reference, reference_seen, _ = uninterrupted
    output_dir = tmp_path / "crashed"
    trainer, _ = build(tiny_model_path, output_dir, fail_at_step=SAVE_STEPS + 1)
    with pytest.raises(ConnectionError, match="the reward server went away"):
        trainer.train()
    assert last_complete_checkpoint(str(output_dir)).endswith(f"checkpoint-{SAVE_STEPS}")

    trainer, seen = build(tiny_model_path, output_dir)
    trainer.train(resume_from_checkpoint=True)
    assert_same_logs(step_logs(reference), step_logs(trainer), range(SAVE_STEPS + 1, MAX_STEPS + 1))
    assert seen == [entry for entry in reference_seen if entry[0] > SAVE_STEPS]
    assert_same_discriminator(reference, trainer)


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_keyboard_interrupt_mid_training(tiny_model_path, tmp_path):
    output_dir = tmp_path / "interrupted"
    trainer, _ = build(tiny_model_path, output_dir)
    trainer.add_callback(InterruptAt(SAVE_STEPS + 1))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert checkpoints(output_dir) == [f"checkpoint-{SAVE_STEPS}"]
    assert last_complete_checkpoint(str(output_dir)).endswith(f"checkpoint-{SAVE_STEPS}")


def test_interrupted_checkpoint_write_is_skipped(uninterrupted, tiny_model_path, tmp_path):
    """Killed while writing checkpoint-4 (after the model, before the discriminator state and the marker), with
    save_total_limit=1: the complete checkpoint-2 survives and `resume_from_checkpoint=True` uses it."""
    reference, reference_seen, _ = uninterrupted
    output_dir = tmp_path / "half-written"
    trainer, _ = build(tiny_model_path, output_dir, save_total_limit=1)
    save_training_state = trainer.discriminator.save_training_state

    def killed_while_saving(directory, state):
        if trainer.state.global_step == MAX_STEPS:
            raise KeyboardInterrupt
        save_training_state(directory, state)

    trainer.discriminator.save_training_state = killed_while_saving
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    incomplete = os.path.join(output_dir, f"checkpoint-{MAX_STEPS}")
    assert os.path.isdir(incomplete) and not os.path.exists(os.path.join(incomplete, COMPLETE_MARKER))
    assert last_complete_checkpoint(str(output_dir)) == os.path.join(output_dir, f"checkpoint-{SAVE_STEPS}")

    trainer, seen = build(tiny_model_path, output_dir, save_total_limit=1)
    with pytest.raises(ValueError, match="not a complete UniAPL checkpoint"):
        trainer.train(resume_from_checkpoint=incomplete)
    trainer.train(resume_from_checkpoint=True)
    assert_same_logs(step_logs(reference), step_logs(trainer), range(SAVE_STEPS + 1, MAX_STEPS + 1))
    assert seen == [entry for entry in reference_seen if entry[0] > SAVE_STEPS]
    assert_same_discriminator(reference, trainer)
    # The rewritten checkpoint-4 is complete and the rotation kept only it.
    assert os.path.exists(os.path.join(incomplete, COMPLETE_MARKER))
    assert checkpoints(output_dir) == [f"checkpoint-{MAX_STEPS}"]


def test_resume_true_without_complete_checkpoint(tiny_model_path, tmp_path):
    output_dir = tmp_path / "empty"
    os.makedirs(output_dir / "checkpoint-2")  # half-written: no marker
    trainer, _ = build(tiny_model_path, output_dir)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_accepts_true_as_a_string(tiny_model_path, tmp_path):
    """`--resume_from_checkpoint true` on a command line or in YAML arrives as the string "true"."""
    trainer, _ = build(tiny_model_path, tmp_path / "fresh")
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint="true")
