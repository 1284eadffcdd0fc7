"""The adversarial term and the SFT term mean what the config says: λ weighs A_adv after TRL's normalisation, the
discriminator's numbers are consistent (bce and bt), the SFT gradient is exactly α·∇ token-mean NLL of each optimizer
step's demonstrations, and a GRPO script keeps GRPO's behaviour after the class swap."""

import copy
import logging
import math
import os

import pytest
import torch
from conftest import CPU_GRPO_SETTINGS, corpus, length_reward, make_completions, make_prompts, uniapl_args
from conftest import build_uniapl as build
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_uniapl import UniAPLConfig, UniAPLTrainer
from trl_uniapl.adversarial_term import DISCRIMINATOR_DIR
from trl_uniapl.demo.tiny import build_tiny_model
from trl_uniapl.discriminator import (
    discriminator_loss_sum,
    group_relative_advantages,
    js_estimate,
)
from trl_uniapl.streams import merge_streams
from trl_uniapl.trainer import COMPLETE_MARKER, _named_reward_func, check_trl_compatibility


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def first_batch_advantages(trainer) -> torch.Tensor:
    """Train one step and return the advantages of its generation batch (before TRL shuffles it)."""
    captured = []
    generate_and_score = trainer._generate_and_score_completions

    def capture(inputs):
        output = generate_and_score(inputs)
        captured.append(output["advantages"].clone())
        return output

    trainer._generate_and_score_completions = capture
    trainer.train()
    return captured[0]


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---- 1. λ weighs
@pytest.mark.parametrize(
    "aggregation", [{}, {"multi_objective_aggregation": "normalize_then_sum"}], ids=["sum_then_normalize", "nts"]
)
def test_advantages_are_linear_in_lambda_with_a_constant_task_reward(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, aggregation
):
    """A constant task reward gives A_task = 0 in every group, so A = λ·A_adv: linear in λ (summing r_adv into the
    rewards before GRPO's group scaling gave unit-scale advantages whatever λ)."""
    advantages = {}
    for coef in (0.01, 0.1, 1.0):
        trainer = build(tmp_path / str(coef), tiny_model_path, preference_dataset, demonstration_dataset,
                        reward=constant_reward, max_steps=1, adversarial_coef=coef, **aggregation)  # fmt: skip
        advantages[coef] = first_batch_advantages(trainer)
    unit = advantages[1.0]
    assert unit.abs().max() > 0.1, "the discriminator gave no advantage"
    for coef in (0.01, 0.1):
        torch.testing.assert_close(advantages[coef], coef * unit, rtol=1e-5, atol=1e-7)
    # Unit scale over the batch: λ is A_adv's weight relative to a unit-scale task advantage.
    assert unit.std().item() == pytest.approx(1.0, abs=0.05)


def test_group_relative_advantages_formula():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, float("nan"), 7.0])
    advantages = group_relative_advantages(rewards, num_generations=4)
    centred = torch.tensor([-1.5, -0.5, 0.5, 1.5, -2 / 3, -2 / 3, 0.0, 4 / 3])
    scored = torch.tensor([True] * 6 + [False, True])
    expected = centred / (centred[scored].std() + 1e-4)
    expected[~scored] = 0.0
    torch.testing.assert_close(advantages, expected)
    # A group the discriminator cannot tell apart keeps advantage 0 (a per-group std would blow it up).
    flat = group_relative_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 2.0, 3.0]), num_generations=4)
    assert flat[:4].abs().max() == 0.0 and flat[4:].abs().max() > 1.0


def test_lambda_zero_advantages_equal_grpo_trainers_bit_for_bit(tmp_path, tiny_model_path, preference_dataset):
    """λ held at 0 (warm-up) while the discriminator trains: the advantages are GRPOTrainer's, bit for bit."""
    demonstrations = Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})
    uniapl = build(tmp_path / "u", tiny_model_path, preference_dataset, demonstrations, sft_coef=0.0,
                   adversarial_coef=0.5, discriminator_warmup_steps=100)  # fmt: skip
    settings = {**CPU_GRPO_SETTINGS}
    grpo = GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=GRPOConfig(output_dir=str(tmp_path / "g"), **settings),
        train_dataset=uniapl.train_dataset,
    )
    dataset = uniapl.train_dataset
    demo, preference = uniapl._streams.demonstration_indices[0], uniapl._streams.preference_indices[0]
    rows = [dataset[demo]] * 4 + [dataset[preference]] * 4
    outputs = []
    for trainer in (uniapl, grpo):
        trainer.model.train()
        torch.manual_seed(123)
        outputs.append(trainer._generate_and_score_completions(copy.deepcopy(rows)))
    assert uniapl.adversarial.state["num_updates"] == 1, "the discriminator did not train"
    assert torch.equal(outputs[0]["completion_ids"], outputs[1]["completion_ids"])
    assert torch.equal(outputs[0]["advantages"], outputs[1]["advantages"])
    assert outputs[0]["advantages"].abs().max() > 0


# ---- 2. discriminator numbers
def test_logged_lambda_is_the_one_applied_and_the_dual_steps_once_per_update(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=4,
                    adversarial_coef_mode="lagrangian", adversarial_coef=0.5, adversarial_coef_lr=0.5,
                    divergence_target=0.3, discriminator_update_interval=2)  # fmt: skip
    applied = []
    advantages = trainer.adversarial.advantages

    def record(mode):
        applied.append(trainer.adversarial.coef)  # what the trainer reads just before, for this batch's advantages
        return advantages(mode)

    trainer.adversarial.advantages = record
    trainer.train()
    logs = step_logs(trainer)
    assert [entry["adversarial/coef"] for entry in logs] == pytest.approx(applied)
    assert applied[0] == pytest.approx(0.5)
    # Updates at generation batches 1 and 3 (interval 2): λ moves after those only.
    assert trainer.adversarial.state["num_updates"] == 2
    assert applied[1] != applied[0] and applied[2] == applied[1] and applied[3] != applied[2]


def test_collapse_streak_counts_discriminator_updates(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    from test_faults import corrupt_discriminator

    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=4,
                    discriminator_update_interval=2, discriminator_collapse_patience=5)  # fmt: skip
    corrupt_discriminator(trainer, constant=3.0)
    trainer.train()
    assert trainer.adversarial.state["num_updates"] == 2
    assert trainer.adversarial.collapse_streak == 2


def test_js_estimate_is_never_negative():
    # A weak discriminator (D ≈ 0.4 on experts, 0.6 on the policy) makes the raw bound negative.
    raw = math.log(2.0) + 0.5 * (math.log(0.4) + math.log(0.4))
    assert raw < 0
    assert js_estimate(4 * math.log(0.4), 4 * math.log(0.4), 4, 4) == 0.0
    assert js_estimate(4 * math.log(0.9), 4 * math.log(0.9), 4, 4) == pytest.approx(math.log(2) + math.log(0.9))


def test_bt_label_smoothing_is_conservative_bradley_terry():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    margin = real - fake
    smoothed, zero = discriminator_loss_sum(real, fake, "bt", label_smoothing=0.1)
    expected = (-(0.9 * torch.nn.functional.logsigmoid(margin)) - 0.1 * torch.nn.functional.logsigmoid(-margin)).sum()
    torch.testing.assert_close(smoothed, expected)
    assert zero.item() == 0.0
    assert not torch.allclose(smoothed, discriminator_loss_sum(real, fake, "bt")[0])
    # Offset-free: adding a constant to every logit changes nothing.
    torch.testing.assert_close(discriminator_loss_sum(real + 7.0, fake + 7.0, "bt", 0.1)[0], smoothed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"discriminator_loss": "bt", "adversarial_reward": "gail"}, r"adversarial_reward='score'"),
        ({"discriminator_loss": "bt", "adversarial_reward": "logd"}, r"arbitrary"),
        ({"discriminator_loss": "bt", "adversarial_coef_mode": "lagrangian"}, r"discriminator_loss='bce'"),
    ],
)
def test_bt_refuses_combinations_without_meaning(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        UniAPLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)


def test_bt_defaults_to_the_centred_score(tmp_path):
    cpu = {"use_cpu": True, "bf16": False}
    assert UniAPLConfig(output_dir=str(tmp_path), discriminator_loss="bt", **cpu).adversarial_reward == "score"
    assert UniAPLConfig(output_dir=str(tmp_path), **cpu).adversarial_reward == "gail"


# ---- 3. the SFT term
class GradientRecorder(TrainerCallback):
    """At each optimizer step, compare the accumulated gradient with α·∇ token-mean NLL of the step's demonstrations
    (`torch.autograd.grad` on the same weights, which the optimizer has not moved yet). The GRPO term contributes
    nothing: the task reward is constant, so every advantage is 0."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.ratios, self.token_counts = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        window = args.gradient_accumulation_steps
        last_micro_step = (trainer._step - 1) % args.steps_per_generation
        start = (last_micro_step // window) * window
        parameters = [p for p in model.parameters() if p.requires_grad]
        nll, tokens = 0.0, 0
        for micro_batch in trainer.sft.micro_batches["train"][start : start + window]:
            if micro_batch["input_ids"].shape[0] == 0:
                continue
            logits = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"]).logits
            targets = micro_batch["labels"][:, 1:]
            mask = targets != -100
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
            nll = nll - (logps.squeeze(-1) * mask).sum()
            tokens += int(mask.sum())
        self.token_counts.append(tokens)
        intended = torch.autograd.grad(trainer.sft.coef_at(state.global_step) * nll / tokens, parameters)
        intended = torch.cat([grad.flatten() for grad in intended])
        actual = torch.cat([p.grad.flatten() for p in parameters])
        self.ratios.append((actual @ intended / (intended @ intended)).item())
        torch.testing.assert_close(actual, intended, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"gradient_accumulation_steps": 1, "steps_per_generation": 2, "per_device_train_batch_size": 4},
        {"gradient_accumulation_steps": 2, "steps_per_generation": 2, "per_device_train_batch_size": 4,
         "num_iterations": 2},
        {"gradient_accumulation_steps": 2, "steps_per_generation": 4, "per_device_train_batch_size": 4},
        {"gradient_accumulation_steps": 1, "steps_per_generation": 1, "per_device_train_batch_size": 8,
         "sft_coef": 0.5},
    ],
    ids=["ga1-spg2", "ga2-spg2-iter2", "ga2-spg4", "ga1-spg1"],
)  # fmt: skip
def test_sft_gradient_is_exactly_alpha_times_the_steps_token_mean_nll(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, settings
):
    # The SFT term reading the generation batch's demonstrations (`sft_per_device_train_batch_size=None`).
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, reward=constant_reward,
                    adversarial_coef=0.0, max_steps=4, max_grad_norm=0.0, demonstration_ratio=0.5,
                    sft_per_device_train_batch_size=None, **settings)  # fmt: skip
    recorder = GradientRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert len(recorder.ratios) == 4
    assert all(count > 0 for count in recorder.token_counts), "an optimizer step carried no demonstration"
    assert recorder.ratios == pytest.approx([1.0] * 4, abs=1e-3)


def test_steps_per_generation_must_be_a_multiple_of_accumulation_for_sft(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    with pytest.raises(ValueError, match="multiple of `gradient_accumulation_steps=2`"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, gradient_accumulation_steps=2,
              steps_per_generation=1, per_device_train_batch_size=8, sft_per_device_train_batch_size=None)  # fmt: skip


def test_sft_coef_zero_runs_no_expert_forward(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, sft_coef=0.0, max_steps=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("an expert forward pass ran with sft_coef=0")

    trainer.sft._nll = forbidden
    trainer.train()
    assert trainer.sft.micro_batches == {"train": [], "eval": []}
    assert trainer.adversarial.state["num_updates"] == 1  # the discriminator still trains


def test_truncation_warning_counts_each_demonstration_once(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, caplog
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=1,
                    max_completion_length=2, demonstration_ratio=0.5)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_uniapl.sft_term"):
        trainer.train()
    # 8 rows = 2 prompts x 4 generations, one of them a demonstration.
    assert "1 of the 1 demonstrations in this batch are longer than max_completion_length=2" in caplog.text
    assert step_logs(trainer)[0]["expert/truncated_ratio"] == 1.0


# ---- 4. no silent wrong inputs for the discriminator
def test_discriminator_instance_with_another_tokenizer_is_refused(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    other = build_tiny_model(tmp_path / "other", corpus(), vocab_size=347)
    discriminator = AutoModelForSequenceClassification.from_pretrained(other, num_labels=1)
    with pytest.raises(ValueError, match="discriminator_processing_class"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, discriminator=discriminator)
    same = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, discriminator=same)
    assert trainer.discriminator.uses_policy_tokens


def test_discriminator_follows_a_policy_quantized_through_model_init_kwargs(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(
            tmp_path, model_init_kwargs={"quantization_config": quantization}, discriminator_type="full_copy"
        ),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert any("4bit" in type(module).__name__ for module in trainer.discriminator.model.modules())


def test_push_to_hub_sees_only_complete_checkpoints(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=1,
                    save_strategy="steps", save_steps=1)  # fmt: skip
    pushed = []

    def spy_push(checkpoint_folder):
        pushed.append(
            (
                os.path.exists(os.path.join(checkpoint_folder, COMPLETE_MARKER)),
                os.path.isdir(os.path.join(checkpoint_folder, DISCRIMINATOR_DIR)),
            )
        )

    trainer.args.push_to_hub = True  # after construction: no Hub repository is created
    trainer._push_from_checkpoint = spy_push
    trainer._finish_current_push = lambda: None
    trainer.train()
    assert pushed == [(True, True)]
    assert trainer.args.push_to_hub is True


# ---- 5. behave like GRPOTrainer where we promise to
def test_preference_rows_without_prompt_are_left_to_grpo_when_an_environment_supplies_them():
    rows = Dataset.from_dict({"environment": ["math", "code"]})
    streams = merge_streams(rows, None, require_prompts=False)
    assert streams.preference_indices == [0, 1] and not streams.has_demonstrations
    with pytest.raises(ValueError, match="train_dataset has no `prompt` column"):
        merge_streams(rows, None)


def test_reward_wrapper_keeps_the_users_signature():
    def environment_reward(environments, **kwargs):
        return [float(len(environment)) for environment in environments]

    wrapped = _named_reward_func(environment_reward, "environment_reward")
    assert wrapped(environments=["ab", "abc"], trainer_state=None) == [2.0, 3.0]


def test_grpo_config_with_a_completion_column_stays_grpo(tmp_path, tiny_model_path):
    """A GRPO script whose dataset has reference answers in `completion` trains as GRPOTrainer after the swap."""
    dataset = Dataset.from_dict({"prompt": make_prompts(16), "completion": make_completions(16)})
    logs = []
    for trainer_class in (UniAPLTrainer, GRPOTrainer):
        trainer = trainer_class(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=GRPOConfig(
                output_dir=str(tmp_path / trainer_class.__name__), **{**CPU_GRPO_SETTINGS, "max_steps": 2}
            ),
            train_dataset=dataset,
        )
        if trainer_class is UniAPLTrainer:
            assert not trainer._has_demonstrations and trainer.discriminator is None
        trainer.train()
        logs.append([(entry["loss"], entry["reward"]) for entry in step_logs(trainer)])
    assert logs[0] == logs[1]


def test_an_unknown_trl_hook_signature_fails_at_import_with_the_supported_range():
    class ChangedTrainer(GRPOTrainer):
        def _generate(self, prompts, images):
            pass

    with pytest.raises(ImportError, match=r"GRPOTrainer\._generate\(self, prompts, images\).*'trl>=1\.16,<1\.17'"):
        check_trl_compatibility(ChangedTrainer)
    check_trl_compatibility(GRPOTrainer)


def test_evaluation_between_two_steps_of_one_generation_keeps_its_demonstrations(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    """With steps_per_generation=2 one generation batch feeds two optimizer steps; an evaluation between them must not
    replace the second step's share of the demonstrations (TRL keeps the policy's rows of that batch buffered too)."""
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(
            tmp_path,
            max_steps=2,
            steps_per_generation=2,
            per_device_train_batch_size=4,
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=8,
            sft_per_device_train_batch_size=None,  # the generation batch's demonstrations, buffered per mode
        ),  # fmt: skip
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        eval_dataset=demonstration_dataset,
    )
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(entry["sft/loss"]) for entry in logs)
    assert len(trainer.sft.micro_batches["train"]) == 2 and len(trainer.sft.micro_batches["eval"]) == 1
    assert all(math.isfinite(entry["eval_sft/loss"]) for entry in trainer.state.log_history if "eval_loss" in entry)


def test_discriminator_update_takes_one_pass_with_the_two_pass_logits_loss_and_gradient(tiny_model_path):
    """The update's single pass over real and fake rows gives what a pass over each side gives (cheap path, same
    objective), with fewer model calls."""
    import copy

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trl_uniapl.discriminator import Discriminator, discriminator_loss_sum

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    reference = copy.deepcopy(model)
    discriminator = Discriminator(model, tokenizer, uses_policy_tokens=True, learning_rate=1e-2, batch_size=8)
    real_rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # two expert completions of different lengths
    fake_rows = [[5, 6, 7, 20, 21], [5, 6, 7, 22], [11, 12, 30, 31, 32, 33, 34], [11, 12, 35]]
    real_batches, fake_batches = discriminator.encode_ids(real_rows), discriminator.encode_ids(fake_rows)
    real_index = torch.tensor([0, 0, 1, 1])

    # Two passes, one per side, on an identical copy: the reference logits, loss and gradient.
    reference.train()
    real_logits = torch.cat([reference(**batch).logits[:, 0] for batch in real_batches])[real_index]
    fake_logits = torch.cat([reference(**batch).logits[:, 0] for batch in fake_batches])
    real_loss, fake_loss = discriminator_loss_sum(real_logits, fake_logits, "bce")
    ((real_loss + fake_loss) / len(fake_rows)).backward()
    reference_grads = [p.grad.clone() for p in reference.parameters() if p.requires_grad]

    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    captured = {}
    original_clip = torch.nn.utils.clip_grad_norm_

    def capture_then_clip(parameters, max_norm, *args, **kwargs):
        captured["grads"] = [p.grad.clone() for p in parameters]
        return original_clip(parameters, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = capture_then_clip
    try:
        update = discriminator.update(real_batches, fake_batches, "bce", 0.0, real_index)
    finally:
        torch.nn.utils.clip_grad_norm_ = original_clip
    assert len(calls) == 1  # 6 rows, batch_size 8: one forward, where two passes take two
    torch.testing.assert_close(update.real_logits, real_logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update.fake_logits, fake_logits.detach(), rtol=1e-5, atol=1e-6)
    assert update.loss == pytest.approx(((real_loss + fake_loss) / len(fake_rows)).item(), rel=1e-5)
    for grad, expected in zip(captured["grads"], reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
