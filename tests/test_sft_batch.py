"""The SFT term's own batch (`sft_per_device_train_batch_size`), the SFT-only warm-up (`sft_warmup_steps`) and
`demonstration_ratio=0`: what each optimizer step reads, its normaliser, resume, and what the warm-up does not run."""

import logging
import math
import statistics
import time

import pytest
import torch
from conftest import build_uniapl, length_reward, make_completions, make_prompts
from datasets import Dataset
from transformers import TrainerCallback

from trl_uniapl import UniAPLConfig
from trl_uniapl.streams import DemonstrationBatches


def constant_reward(completions, **kwargs):
    """Every advantage is 0, so the GRPO term contributes no gradient: only the SFT term moves the policy."""
    return [1.0] * len(completions)


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def record_sft_reads(trainer) -> dict[int, list[list[int]]]:
    """Optimizer step -> this process's demonstration rows per micro-step, as the SFT term read them."""
    reads = {}
    own_micro_batch = trainer.sft._own_micro_batch

    def recorded():
        micro_batch = own_micro_batch()
        step, rows_per_micro_step, _ = trainer.sft._step_cache
        reads[step] = rows_per_micro_step
        return micro_batch

    trainer.sft._own_micro_batch = recorded
    return reads


# ---- 1. the sampler
def test_demonstration_batches_are_disjoint_across_processes_and_reshuffled_per_epoch():
    batches = DemonstrationBatches(list(range(100, 110)), batch_size=2, num_processes=2, seed=3)
    assert batches.blocks_per_epoch == 2  # 10 demonstrations, blocks of 4: 2 per epoch, 2 left over
    epochs = {}
    for micro_step in range(8):
        first, second = batches.indices(micro_step, 0), batches.indices(micro_step, 1)
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        epochs.setdefault(batches.epoch_of(micro_step), []).extend(first + second)
    for rows in epochs.values():
        assert len(rows) == len(set(rows)) == 8  # no demonstration twice within an epoch
    assert epochs[0] != epochs[1]  # reshuffled
    again = DemonstrationBatches(list(range(100, 110)), batch_size=2, num_processes=2, seed=3)
    assert [again.indices(step, 1) for step in (7, 0, 5)] == [batches.indices(step, 1) for step in (7, 0, 5)]
    other_seed = DemonstrationBatches(list(range(100, 110)), batch_size=2, num_processes=2, seed=4)
    assert [other_seed.indices(step, 0) for step in range(4)] != [batches.indices(step, 0) for step in range(4)]


def test_a_batch_larger_than_the_demonstrations_runs_over_epochs_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_uniapl.streams"):
        batches = DemonstrationBatches(list(range(5)), batch_size=4, num_processes=2, seed=0)
    assert "larger than the 5 demonstrations" in caplog.text
    rows = [index for step in range(5) for process in (0, 1) for index in batches.indices(step, process)]
    assert len(rows) == 40
    for epoch in range(8):  # consecutive runs of 5 rows are whole permutations
        assert sorted(rows[5 * epoch : 5 * epoch + 5]) == list(range(5))


# ---- 2. rows and normaliser of every optimizer step
class StepGradientRecorder(TrainerCallback):
    """At each optimizer step, the demonstrations the sampler assigns to it and α·∇ token-mean NLL of exactly those,
    computed here from their token ids, against the accumulated gradient."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows, self.ratios = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        sft = self.trainer.sft
        window = args.gradient_accumulation_steps
        rows = [i for m in range(window) for i in sft.batches.indices(state.global_step * window + m, 0)]
        self.rows.append(rows)
        parameters = [p for p in model.parameters() if p.requires_grad]
        nll, tokens = 0.0, 0
        for index in rows:
            prompt_ids, expert_ids = sft._tokenized_demonstration(index)
            input_ids = torch.tensor([prompt_ids + expert_ids])
            logits = model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1].float()
            nll = nll - torch.log_softmax(logits, -1).gather(-1, torch.tensor(expert_ids)[:, None]).sum()
            tokens += len(expert_ids)
        intended = torch.autograd.grad(sft.coef_at(state.global_step) * nll / tokens, parameters)
        intended = torch.cat([grad.flatten() for grad in intended])
        actual = torch.cat([p.grad.flatten() for p in parameters])
        self.ratios.append((actual @ intended / (intended @ intended)).item())
        torch.testing.assert_close(actual, intended, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"gradient_accumulation_steps": 1, "steps_per_generation": 1, "per_device_train_batch_size": 8},
        {"gradient_accumulation_steps": 2, "steps_per_generation": 2, "per_device_train_batch_size": 4},
        {"gradient_accumulation_steps": 1, "steps_per_generation": 2, "per_device_train_batch_size": 4},
        {"gradient_accumulation_steps": 2, "steps_per_generation": 4, "per_device_train_batch_size": 4,
         "num_iterations": 2},
    ],
    ids=["ga1-spg1", "ga2-spg2", "ga1-spg2", "ga2-spg4-iter2"],
)  # fmt: skip
def test_each_optimizer_step_reads_its_sft_batch_with_the_exact_normaliser(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, settings
):
    trainer = build_uniapl(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset,
                           reward=constant_reward, adversarial_coef=0.0, sft_coef=0.5, max_steps=4, max_grad_norm=0.0,
                           sft_per_device_train_batch_size=3, **settings)  # fmt: skip
    recorder = StepGradientRecorder(trainer)
    trainer.add_callback(recorder)
    reads = record_sft_reads(trainer)
    trainer.train()
    window = settings["gradient_accumulation_steps"]
    assert [len(rows) for rows in recorder.rows] == [3 * window] * 4
    assert [sum(reads[step], []) for step in range(4)] == recorder.rows  # what the trainer read is what was assigned
    assert recorder.ratios == pytest.approx([1.0] * 4, abs=1e-3)
    # 8 demonstrations in blocks of 3: two micro-steps per epoch, so these steps cross epochs.
    assert len({trainer.sft.batches.epoch_of(step * window) for step in range(4)}) > 1


def test_the_sft_batch_does_not_depend_on_the_rolled_out_prompts(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    reads = []
    for ratio in (0.25, 0.5):
        trainer = build_uniapl(tmp_path / str(ratio), tiny_model_path, preference_dataset, demonstration_dataset,
                               max_steps=2, demonstration_ratio=ratio, sft_per_device_train_batch_size=4)  # fmt: skip
        reads.append(record_sft_reads(trainer))
        trainer.train()
    assert reads[0] == reads[1] and len(reads[0]) == 2


# ---- 3. resume mid-epoch
def test_resume_mid_epoch_reads_the_same_demonstrations(tmp_path, tiny_model_path, preference_dataset):
    demonstrations = Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})
    settings = dict(max_steps=5, save_strategy="steps", save_steps=3, sft_per_device_train_batch_size=3,
                    adversarial_coef=0.0)  # fmt: skip
    uninterrupted = build_uniapl(tmp_path / "a", tiny_model_path, preference_dataset, demonstrations, **settings)
    expected = record_sft_reads(uninterrupted)
    uninterrupted.train()
    assert uninterrupted.sft.batches.epoch_of(3) == 1 and uninterrupted.sft.batches.epoch_of(2) == 1  # mid-epoch

    again = build_uniapl(tmp_path / "b", tiny_model_path, preference_dataset, demonstrations, **settings)
    actual = record_sft_reads(again)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert sorted(actual) == [3, 4] and all(actual[step] == expected[step] for step in (3, 4))
    for (name, a), (_, b) in zip(uninterrupted.model.named_parameters(), again.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert step_logs(again)[-1]["sft/loss"] == pytest.approx(step_logs(uninterrupted)[-1]["sft/loss"], rel=1e-5)


# ---- 4. demonstration_ratio=0: the discriminator reads the SFT batch
def test_ratio_zero_trains_the_discriminator_on_the_sft_batch(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    trainer = build_uniapl(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=2,
                           demonstration_ratio=0.0, sft_per_device_train_batch_size=3)  # fmt: skip
    discriminator = trainer.discriminator
    real_sequences, rolled_out = [], []
    update = discriminator.update

    def recorded_update(real_batches, fake_batches, *args, **kwargs):
        real_sequences.append(
            [
                ids[mask.bool()].tolist()
                for batch in real_batches
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
            ]
        )
        rolled_out.append(list(trainer._batch.is_demonstration))
        return update(real_batches, fake_batches, *args, **kwargs)

    discriminator.update = recorded_update
    before = [p.detach().clone() for p in discriminator.trainable_parameters]
    trainer.train()
    assert len(real_sequences) == 2
    for step, sequences in enumerate(real_sequences):
        expected = [prompt + expert for prompt, expert, _ in trainer.sft.step_demonstrations(step)]
        assert sequences == expected and len(sequences) == 3
        assert not any(rolled_out[step])  # every rollout is a preference prompt: the fakes
    assert any(not torch.equal(a, b) for a, b in zip(before, discriminator.trainable_parameters))
    assert all("discriminator/acc_real" in entry for entry in step_logs(trainer))


# ---- 5. the SFT-only warm-up
@pytest.mark.parametrize("sft_warmup_steps", [3, 0.5])  # 0.5 of 5 steps, rounded up: the same 3 steps
def test_warmup_steps_generate_nothing_then_the_full_objective_runs(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, sft_warmup_steps
):
    reward_calls = []

    def counted_reward(completions, trainer_state, **kwargs):
        reward_calls.append(trainer_state.global_step)
        return length_reward(completions)

    trainer = build_uniapl(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, reward=counted_reward,
                           max_steps=5, sft_warmup_steps=sft_warmup_steps, sft_warmup_learning_rate=1e-3,
                           learning_rate=1e-2, lr_scheduler_type="linear", sft_coef=0.0,
                           sft_per_device_train_batch_size=4)  # fmt: skip
    generations = []
    generate = trainer._generate

    def counted_generate(prompts):
        generations.append(trainer.state.global_step)
        return generate(prompts)

    trainer._generate = counted_generate
    trainer.train()
    assert generations == [3, 4] and sorted(set(reward_calls)) == [3, 4]
    assert trainer.adversarial.state["num_updates"] == 2 and trainer.adversarial.state["generation_batches"] == 2
    logs = step_logs(trainer)
    for entry in logs[:3]:  # SFT only, at the warm-up's own learning rate
        assert "reward" not in entry and "discriminator/loss" not in entry and math.isfinite(entry["sft/loss"])
        assert entry["learning_rate"] == pytest.approx(1e-3)
    for entry in logs[3:]:  # SFT -> A-GRPO: the policy phase without the SFT term, its schedule starting afresh
        assert "reward" in entry and "discriminator/loss" in entry and "sft/loss" not in entry
    assert [entry["learning_rate"] for entry in logs[3:]] == pytest.approx([1e-2, 5e-3])


def test_warmup_step_costs_about_an_sft_trainer_step(tmp_path, tiny_model_path):
    """The warm-up step is Trainer's step on the SFT batch alone; measured against TRL's SFTTrainer on the same
    demonstrations, batch, model and optimizer (the lower quartile of the steps of interleaved runs: a fast step's
    cost, the least noisy estimate on a shared machine)."""
    from trl import SFTConfig, SFTTrainer

    rows = 32
    prompts = [[{"role": "user", "content": p}] for p in make_prompts(rows)]
    completions = [[{"role": "assistant", "content": c + " " + c}] for c in make_completions(rows)]
    demonstrations = Dataset.from_dict({"prompt": prompts, "completion": completions})
    preference = Dataset.from_dict({"prompt": prompts})
    steps, batch = 12, 16
    common = dict(use_cpu=True, bf16=False, report_to="none", learning_rate=1e-3, max_steps=steps, logging_steps=100,
                  save_strategy="no", disable_tqdm=True, gradient_checkpointing=False, seed=0)  # fmt: skip

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    def uniapl_step_times():
        trainer = build_uniapl(tmp_path / "uniapl", tiny_model_path, preference, demonstrations,
                               sft_warmup_steps=steps, sft_per_device_train_batch_size=batch, adversarial_coef=0.0,
                               per_device_train_batch_size=8, max_completion_length=64, **common)  # fmt: skip
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        return timer.times[2:]

    def sft_step_times():
        args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=batch, max_length=None,
                         **common)  # fmt: skip
        trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=demonstrations)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        return timer.times[2:]

    uniapl, sft = [], []
    for _ in range(2):
        sft += sft_step_times()
        uniapl += uniapl_step_times()
    # The lower quartile: a fast step's cost, as the minimum is, but not one outlier's (a minimum alone flaked at 1.22
    # on an idle machine with the medians 1.03 apart).
    ratio = statistics.quantiles(uniapl, n=4)[0] / statistics.quantiles(sft, n=4)[0]
    assert ratio <= 1.2, (ratio, min(uniapl), min(sft), statistics.median(uniapl), statistics.median(sft))


def test_resume_inside_and_after_the_warmup_equals_the_uninterrupted_run(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    settings = dict(max_steps=6, sft_warmup_steps=3, save_strategy="steps", save_steps=2,
                    sft_per_device_train_batch_size=3, adversarial_coef_mode="lagrangian",
                    adversarial_coef_lr=0.5)  # fmt: skip
    reference = build_uniapl(tmp_path / "full", tiny_model_path, preference_dataset, demonstration_dataset, **settings)
    reference.train()
    expected = {entry["step"]: entry for entry in step_logs(reference)}
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # inside the warm-up, and after it
        resumed = build_uniapl(tmp_path / checkpoint, tiny_model_path, preference_dataset, demonstration_dataset,
                               **settings)  # fmt: skip
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / checkpoint))
        first = int(checkpoint.split("-")[1]) + 1  # the log history before it comes from the checkpoint
        actual = {entry["step"]: entry for entry in step_logs(resumed) if entry["step"] >= first}
        assert sorted(actual) == list(range(first, 7))
        for step in actual:
            for key in ("loss", "sft/loss", "learning_rate", "reward", "adversarial/coef", "discriminator/loss"):
                if key in expected[step]:
                    assert actual[step][key] == pytest.approx(expected[step][key], rel=1e-5), (checkpoint, step, key)
        for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
            torch.testing.assert_close(a, b, msg=f"{checkpoint}: {name}")
        assert resumed.adversarial.state == reference.adversarial.state
        assert resumed.adversarial.adversarial_coef == pytest.approx(reference.adversarial.adversarial_coef)


# ---- 6. what is refused
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sft_warmup_steps": 2, "sft_per_device_train_batch_size": None}, "Set `sft_per_device_train_batch_size`"),
        ({"sft_per_device_train_batch_size": 0}, "`sft_per_device_train_batch_size` must be >= 1"),
        ({"demonstration_ratio": 0.0, "discriminator_loss": "bt"}, "Use `discriminator_loss='bce'`"),
        ({"demonstration_ratio": 0.0, "adversarial_reward_scope": "demonstrations"}, "rolls out none"),
        (
            {"demonstration_ratio": 0.0, "sft_per_device_train_batch_size": None, "sft_warmup_steps": 0},
            "real samples from the SFT term",
        ),  # fmt: skip
        ({"sft_per_device_train_batch_size": None}, "or `sft_warmup_steps=0` for no SFT-only warm-up"),
        ({"sft_warmup_learning_rate": 0.0}, "`sft_warmup_learning_rate` must be > 0"),
        ({"sft_warmup_steps": 2.5}, "must be a whole number of steps (>= 1) or a share of the run in (0, 1)"),
        ({"discriminator_freeze_after_updates": -1}, "`discriminator_freeze_after_updates` must be >= 0"),
    ],
)
def test_bad_sft_and_ratio_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        UniAPLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)
