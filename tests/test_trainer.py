"""UniAPLTrainer on a tiny local model: training, drop-in equivalence with GRPOTrainer, LoRA/4-bit, checkpoints."""

import json
import math
import os

import pytest
import torch
from conftest import CPU_GRPO_SETTINGS, length_reward, make_completions, make_prompts, uniapl_args
from conftest import build_uniapl as build
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from trl_uniapl import UniAPLConfig, UniAPLTrainer
from trl_uniapl.streams import MixedRepeatSampler

UNIAPL_METRICS = [
    "sft/loss",
    "sft/coef",
    "expert/logp",
    "expert/mean_length",
    "discriminator/loss",
    "discriminator/acc_real",
    "discriminator/acc_fake",
    "discriminator/js_estimate",
    "adversarial/reward_mean",
    "adversarial/unscored",
    "adversarial/coef",
    "rewards/adversarial/mean",
    "rewards/adversarial/std",
    "completions/mean_length",
]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model, names=None) -> dict[str, bool]:
    return {
        name: not torch.equal(before[name], param)
        for name, param in model.named_parameters()
        if names is None or name in names
    }


def test_trains_policy_and_discriminator_and_logs_metrics(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset)
    policy_before = snapshot(trainer.model)
    discriminator_before = snapshot(trainer.discriminator.model)
    trainer.train()

    policy_changed = changed(policy_before, trainer.model)
    assert all(policy_changed.values()), [n for n, c in policy_changed.items() if not c]
    discriminator_changed = changed(discriminator_before, trainer.discriminator.model)
    assert all(discriminator_changed.values()), [n for n, c in discriminator_changed.items() if not c]

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in UNIAPL_METRICS:
        values = [entry[key] for entry in logs]
        assert all(math.isfinite(v) for v in values), (key, values)
    assert all(entry["adversarial/coef"] == pytest.approx(0.1) for entry in logs)
    # The discriminator is not a reward function: its advantage is added after TRL's normalisation.
    assert "adversarial" not in trainer.reward_func_names


def test_every_generation_batch_mixes_both_streams(tmp_path, tiny_model_path, preference_dataset):
    demonstrations = Dataset.from_dict({"prompt": make_prompts(6, offset=3), "completion": make_completions(6)})
    args = uniapl_args(tmp_path, per_device_train_batch_size=16, demonstration_ratio=0.25, adversarial_coef=0.0)
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=args,
        train_dataset=preference_dataset,
        demonstration_dataset=demonstrations,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, MixedRepeatSampler)
    indices = list(sampler)
    batch = args.generation_batch_size
    num_preferences = len(preference_dataset)
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        num_demo_rows = sum(index >= num_preferences for index in chunk)
        assert num_demo_rows == 1 * args.num_generations  # round(0.25 * 4 prompts) = 1 demonstration prompt
    # One epoch is one pass over the preference prompts: each is drawn at most once (the incomplete last chunk of
    # 16 % 3 = 1 prompt is dropped, as in TRL's RepeatSampler).
    repeats = args.num_generations * args.steps_per_generation
    preference_draws = [i for i in indices[::repeats] if i < num_preferences]
    assert len(preference_draws) == len(set(preference_draws)) == 15


def test_sft_term_alone_lowers_demonstration_nll(tmp_path, tiny_model_path, demonstration_dataset):
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)  # zero advantages: only the SFT term moves the policy

    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=constant_reward,
        args=uniapl_args(tmp_path, adversarial_coef=0.0, max_steps=6, learning_rate=5e-3),
        train_dataset=demonstration_dataset,  # demonstrations mixed into the training set
    )
    assert trainer.discriminator is None

    def demonstration_nll() -> float:
        tokenizer = trainer.processing_class
        total, count = 0.0, 0
        with torch.no_grad():
            for row in demonstration_dataset:
                prompt_ids = tokenizer(row["prompt"])["input_ids"]
                completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt_ids + completion_ids + [tokenizer.eos_token_id]])
                logits = trainer.model(ids).logits[0, :-1].float()
                logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                total -= logps[len(prompt_ids) - 1 :].sum().item()
                count += len(completion_ids) + 1
        return total / count

    before = demonstration_nll()
    trainer.train()
    after = demonstration_nll()
    assert after < before - 0.5, (before, after)
    sft_losses = [entry["sft/loss"] for entry in trainer.state.log_history if "sft/loss" in entry]
    assert sft_losses[-1] < sft_losses[0]


def _loss_history(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("config_class", ["grpo", "uniapl"])
def test_drop_in_equals_grpo_trainer(tmp_path, tiny_model_path, preference_dataset, config_class):
    common = {**CPU_GRPO_SETTINGS, "beta": 0.04, "loss_type": "grpo"}
    grpo = GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **common),
        train_dataset=preference_dataset,
    )
    grpo.train()
    if config_class == "grpo":
        args = GRPOConfig(output_dir=str(tmp_path / "uniapl"), **common)
    else:
        args = UniAPLConfig(output_dir=str(tmp_path / "uniapl"), sft_coef=0.0, adversarial_coef=0.0, **common)
    uniapl = UniAPLTrainer(
        model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=preference_dataset
    )
    uniapl.train()

    assert _loss_history(uniapl) == _loss_history(grpo)
    assert len(_loss_history(grpo)) == 3
    grpo_params = dict(grpo.model.named_parameters())
    for name, param in uniapl.model.named_parameters():
        assert torch.equal(param, grpo_params[name]), name
    assert uniapl.discriminator is None
    assert not any(key.startswith(("sft/", "discriminator/")) for e in uniapl.state.log_history for key in e)


def test_lora_policy_and_discriminator(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        peft_config=peft_config,
    )
    policy_before = snapshot(trainer.model)
    discriminator_before = snapshot(trainer.discriminator.model)
    trainer.train()

    for model, before in ((trainer.model, policy_before), (trainer.discriminator.model, discriminator_before)):
        for name, was_changed in changed(before, model).items():
            if "lora_" in name:
                assert was_changed, f"adapter weight {name} did not change"
            elif "score" in name and "modules_to_save" in name:
                assert was_changed, f"score head {name} did not train"
            elif "base_layer" in name or "embed_tokens" in name or "layernorm" in name:
                assert not was_changed, f"base weight {name} changed"


def test_4bit_lora_trains_end_to_end(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=2),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        quantization_config=quantization_config,
    )
    # The default discriminator's adapter sits on the policy's own 4-bit layers: no second base model.
    targets = trainer.discriminator.model._targets.values()
    assert targets and all("4bit" in type(m).__name__ for m in targets)
    assert not any("4bit" in type(m).__name__ for m in trainer.discriminator.model.modules())
    policy_before = snapshot(trainer.model)
    discriminator_before = snapshot(trainer.discriminator.model)
    trainer.train()
    assert any(v for n, v in changed(policy_before, trainer.model).items() if "lora_" in n)
    assert any(v for n, v in changed(discriminator_before, trainer.discriminator.model).items() if "lora_" in n)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["sft/loss"]) for entry in logs)


def test_conversational_demonstrations_render_like_the_policy_prompt(tmp_path, tiny_model_path):
    prompts = make_prompts(8, conversational=True)
    preference = Dataset.from_dict({"prompt": prompts})
    demonstrations = Dataset.from_dict(
        {"prompt": make_prompts(4, conversational=True, offset=2), "completion": make_completions(4, True)}
    )
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=1),
        train_dataset=preference,
        demonstration_dataset=demonstrations,
    )
    row = demonstrations[0]
    expert_ids, _ = trainer.sft.expert_token_ids(row)
    tokenizer = trainer.processing_class
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(expert_ids) == full[len(prompt_text) :].rstrip("\n")
    assert expert_ids[-1] == tokenizer.eos_token_id
    trainer.train()
    assert any("sft/loss" in entry for entry in trainer.state.log_history)


def test_save_model_writes_a_reloadable_discriminator(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    # The separate discriminator saves a whole sequence classifier (the shared one: test_shared_discriminator.py).
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=1,
                    discriminator_type="full_copy")  # fmt: skip
    trainer.train()
    trainer.save_model()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "discriminator", num_labels=1)
    for name, param in trainer.discriminator.model.named_parameters():
        assert torch.equal(param, reloaded.state_dict()[name]), name
    AutoTokenizer.from_pretrained(tmp_path / "discriminator")
    card = (tmp_path / "README.md").read_text() if (tmp_path / "README.md").exists() else ""
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "uniapl" in card and "2509.25148" in card


def test_checkpoint_restores_discriminator_optimizer_and_lambda(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    args = uniapl_args(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        adversarial_coef_mode="lagrangian",
        adversarial_coef=0.2,
        adversarial_coef_lr=0.5,
        divergence_target=0.0,
    )
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=args,
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "uniapl_checkpoint_complete.json").exists()
    saved_lambda = trainer.adversarial.adversarial_coef
    assert saved_lambda != 0.2  # dual ascent moved it
    saved_weights = snapshot(trainer.discriminator.model)
    saved_optimizer = trainer.discriminator.optimizer.state_dict()

    resumed = build(
        tmp_path,
        tiny_model_path,
        preference_dataset,
        demonstration_dataset,
        max_steps=2,
        adversarial_coef_mode="lagrangian",
        adversarial_coef=0.2,
    )
    assert resumed.adversarial.adversarial_coef == 0.2
    resumed.create_optimizer_and_scheduler(num_training_steps=2)
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.adversarial.adversarial_coef == pytest.approx(saved_lambda)
    assert resumed.adversarial.state["num_updates"] == 2
    for name, param in resumed.discriminator.model.named_parameters():
        assert torch.equal(param, saved_weights[name]), name
    loaded_optimizer = resumed.discriminator.optimizer.state_dict()
    for key, state in saved_optimizer["state"].items():
        assert torch.equal(state["exp_avg"], loaded_optimizer["state"][key]["exp_avg"])
        assert int(state["step"]) == int(loaded_optimizer["state"][key]["step"])
    with open(checkpoint / "discriminator" / "discriminator_state.json") as f:
        assert json.load(f)["adversarial_coef"] == pytest.approx(saved_lambda)


def test_discriminator_with_its_own_tokenizer(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=1),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        discriminator_processing_class=tokenizer,
    )
    assert not trainer.discriminator.uses_policy_tokens
    trainer.train()
    assert any("discriminator/acc_real" in entry for entry in trainer.state.log_history)


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_demonstration_without_prompt(tmp_path, tiny_model_path, preference_dataset):
    demonstrations = Dataset.from_dict({"prompt": ["a", None, "c"], "completion": ["x", "y", "z"]})
    with pytest.raises(ValueError, match=r"demonstration_dataset row 1 has no `prompt`"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstrations)
    no_column = Dataset.from_dict({"question": ["a"], "completion": ["x"]})
    with pytest.raises(ValueError, match=r"demonstration_dataset has no `prompt` column.*Rename"):
        build(tmp_path, tiny_model_path, preference_dataset, no_column)


def test_demonstration_with_empty_completion(tmp_path, tiny_model_path, preference_dataset):
    demonstrations = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "  "]})
    with pytest.raises(ValueError, match=r"demonstration_dataset row 2, field `completion` is empty"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstrations)
    mixed_in = Dataset.from_dict({"prompt": ["a", "b"], "completion": [None, ""]})
    with pytest.raises(ValueError, match=r"train_dataset row 1, field `completion` is empty"):
        build(tmp_path, tiny_model_path, mixed_in)


def test_standard_mixed_with_conversational(tmp_path, tiny_model_path, preference_dataset):
    demonstrations = Dataset.from_dict(
        {"prompt": make_prompts(2, conversational=True), "completion": make_completions(2, conversational=True)}
    )
    with pytest.raises(ValueError, match=r"Standard rows .*train_dataset.* mixed with conversational rows"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstrations)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_demonstration_ratio_out_of_range(tmp_path, ratio):
    with pytest.raises(ValueError, match=r"`demonstration_ratio` must be in \[0, 1\]"):
        uniapl_args(tmp_path, demonstration_ratio=ratio)


def test_demonstration_ratio_without_demonstrations(tmp_path, tiny_model_path, preference_dataset):
    with pytest.raises(ValueError, match=r"`demonstration_ratio=0.5` but no demonstrations were given"):
        build(tmp_path, tiny_model_path, preference_dataset, demonstration_ratio=0.5, adversarial_coef=0.0)


def test_adversarial_coef_without_demonstrations(tmp_path, tiny_model_path, preference_dataset):
    with pytest.raises(ValueError, match=r"`adversarial_coef=0.1` .* needs expert demonstrations"):
        build(tmp_path, tiny_model_path, preference_dataset)


def test_discriminator_tokenizer_without_pad_or_eos(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"discriminator's tokenizer .* has neither a pad token nor an eos token"):
        UniAPLTrainer(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=uniapl_args(tmp_path),
            train_dataset=preference_dataset,
            demonstration_dataset=demonstration_dataset,
            discriminator_processing_class=tokenizer,
        )
    # With an eos but no pad, the eos becomes the pad token.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        discriminator_processing_class=tokenizer,
    )
    assert trainer.discriminator.processing_class.pad_token == tokenizer.eos_token
    assert trainer.discriminator.model.config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sft_coef_schedule", "exponential", r"`sft_coef_schedule` must be one of"),
        ("adversarial_reward", "wgan", r"`adversarial_reward` must be one of"),
        ("discriminator_loss", "hinge", r"`discriminator_loss` must be one of"),
        ("sft_coef", -1.0, r"`sft_coef` must be >= 0"),
        ("discriminator_update_interval", 0, r"`discriminator_update_interval` must be >= 1"),
        ("discriminator_label_smoothing", 0.7, r"`discriminator_label_smoothing` must be in"),
        ("discriminator_init_kwargs", "{not json", r"discriminator_init_kwargs|JSON|json"),
    ],
)
def test_config_validation(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        uniapl_args(tmp_path, **{field: value})


def test_lagrangian_divergence_target_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"`divergence_target` must be in \[0, log 2"):
        uniapl_args(tmp_path, adversarial_coef_mode="lagrangian", divergence_target=1.0)


def test_config_json_dict_field(tmp_path):
    args = uniapl_args(tmp_path, discriminator_init_kwargs='{"dtype": "float32"}')
    assert args.discriminator_init_kwargs == {"dtype": "float32"}


def test_missing_discriminator_path(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    with pytest.raises(ValueError, match=r"Could not load the discriminator from .*does-not-exist"):
        build(
            tmp_path,
            tiny_model_path,
            preference_dataset,
            demonstration_dataset,
            discriminator_model_name_or_path=str(tmp_path / "does-not-exist"),
        )


def test_sft_coef_schedules(tmp_path, tiny_model_path, demonstration_dataset):
    trainer = build(
        tmp_path,
        tiny_model_path,
        demonstration_dataset,
        adversarial_coef=0.0,
        sft_coef=1.0,
        sft_coef_final=0.2,
        sft_coef_schedule="cosine",
        sft_coef_warmup_steps=2,
    )
    trainer.state.max_steps = 12
    coefs = [trainer.sft.coef_at(step) for step in range(12)]
    assert coefs[0] == pytest.approx(0.5) and coefs[1] == pytest.approx(1.0)
    assert coefs[2] == pytest.approx(1.0) and coefs[-1] > 0.2 and coefs[-1] < 0.25
    assert all(a >= b for a, b in zip(coefs[1:], coefs[2:], strict=False))
    trainer.args.sft_coef_schedule = "linear"
    assert trainer.sft.coef_at(7) == pytest.approx(0.2 + 0.8 * (1 - 5 / 10))


def test_plain_grpo_config_with_demonstrations_uses_uniapl_defaults(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
        num_generations=4, max_completion_length=8, max_steps=1,
    )  # fmt: skip
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=args,
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    assert isinstance(trainer.args, UniAPLConfig)
    defaults = UniAPLConfig.__dataclass_fields__
    # The defaults are the staged SFT -> A-GRPO: half the run SFT only, then no SFT term and the discriminator.
    assert trainer.args.sft_warmup_steps == defaults["sft_warmup_steps"].default == 0.5
    assert trainer.args.sft_coef == defaults["sft_coef"].default == 0.0
    assert trainer.args.adversarial_coef == defaults["adversarial_coef"].default > 0
    assert trainer.sft is not None and trainer.discriminator is not None
    assert trainer.args.get_sft_warmup_steps(200) == 100 and trainer.args.get_sft_warmup_steps(5) == 3
    assert os.path.basename(trainer.args.output_dir) == os.path.basename(str(tmp_path))


@pytest.mark.parametrize(
    "options",
    [
        {"discriminator_loss": "bt", "discriminator_label_smoothing": 0.1},
        {"adversarial_reward_scope": "demonstrations", "adversarial_reward": "logd"},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, "num_iterations": 2},
        {"steps_per_generation": 2, "per_device_train_batch_size": 4, "beta": 0.04, "loss_type": "grpo"},
        {"discriminator_warmup_steps": 1, "discriminator_update_interval": 2, "discriminator_steps": 2},
        {"scale_rewards": "batch", "multi_objective_aggregation": "normalize_then_sum", "loss_type": "bnpo"},
    ],
    ids=["bt-smoothed", "scope-demos-logd", "grad-accum-iterations", "steps-per-generation-beta", "d-schedule", "agg"],
)
def test_grpo_and_discriminator_options_train(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, options
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=2, **options)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and "sft/coef" in entry
    # Every optimizer step carries demonstrations, whatever steps_per_generation and num_iterations.
    assert all(math.isfinite(entry["sft/loss"]) for entry in logs)
    # Discriminator metrics come with each generation (with num_iterations=2, every other step); bt's are pairwise.
    if options.get("discriminator_loss") == "bt":
        assert trainer.args.adversarial_reward == "score"
        assert 0.0 <= logs[0]["discriminator/pairwise_acc"] <= 1.0
        assert math.isfinite(logs[0]["discriminator/score_gap"])
        assert "discriminator/acc_real" not in logs[0] and "discriminator/js_estimate" not in logs[0]
    else:
        assert math.isfinite(logs[0]["discriminator/acc_real"])
    if "discriminator_warmup_steps" in options:
        assert [entry["adversarial/coef"] for entry in logs] == [0.0, 0.1]
        assert trainer.adversarial.state["num_updates"] == 1  # interval 2: updated at step 0 only


def test_evaluation_with_demonstrations(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
        eval_dataset=demonstration_dataset,
    )
    trainer.train()
    evaluation = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluation and math.isfinite(evaluation[0]["eval_sft/loss"])
    assert math.isfinite(evaluation[0]["eval_discriminator/acc_real"])
    assert trainer.adversarial.state["num_updates"] == 1  # evaluation never trains the discriminator


def test_streams_with_null_typed_columns_merge(tmp_path):
    """A JSON field that is null in every row of one file is typed `null`; it takes the other stream's type."""
    from trl_uniapl.streams import merge_streams

    preference_file, demonstration_file = tmp_path / "preference.jsonl", tmp_path / "demonstrations.jsonl"
    preference_file.write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", "kwargs": [{"keyword": None, "n": i}]}) for i in range(3))
    )
    demonstration_file.write_text(
        "\n".join(
            json.dumps({"prompt": f"d{i}", "completion": f"c{i}", "kwargs": [{"keyword": "sun", "n": None}]})
            for i in range(2)
        )
    )
    from datasets import load_dataset

    preference = load_dataset("json", data_files=str(preference_file), split="train")
    demonstrations = load_dataset("json", data_files=str(demonstration_file), split="train")
    streams = merge_streams(preference, demonstrations)
    assert streams.preference_indices == [0, 1, 2] and streams.demonstration_indices == [3, 4]
    assert streams.dataset[4]["kwargs"] == [{"keyword": "sun", "n": None}]
    assert streams.dataset[0]["kwargs"] == [{"keyword": None, "n": 0}]
    assert streams.dataset[1]["completion"] is None and streams.dataset[3]["completion"] == "c0"


@pytest.mark.parametrize("score_in_update_pass", [True, False])
def test_adversarial_rewards_come_from_the_discriminator_before_or_after_its_update(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, score_in_update_pass
):
    """Default (cheap) path: demonstration rows are rewarded with the logits of the update's own forward pass, i.e.
    by the discriminator before its optimizer step, and only the preference rows get a scoring pass. `False`: every
    row is scored by the discriminator after the update."""
    import copy

    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, max_steps=1,
                    adversarial_reward="airl", adversarial_reward_clip=None,
                    discriminator_score_in_update_pass=score_in_update_pass,
                    # A separate discriminator: rescoring after training must not see the policy's step (the shared
                    # one reads the policy's current weights, which move after the scoring).
                    discriminator_type="full_copy")  # fmt: skip
    discriminator = trainer.discriminator
    initial_model = copy.deepcopy(discriminator.model).eval()
    calls = {"update_real": None, "update_fake": None, "scored_rows": 0}
    update, score = discriminator.update, discriminator.score

    def spy_update(real_batches, fake_batches, *args, **kwargs):
        calls["update_real"], calls["update_fake"] = real_batches, fake_batches
        return update(real_batches, fake_batches, *args, **kwargs)

    def spy_score(batches):
        calls["scored_rows"] += sum(len(batch["input_ids"]) for batch in batches)
        return score(batches)

    discriminator.update, discriminator.score = spy_update, spy_score
    trainer.train()

    # `airl` without clipping: r_adv is the logit itself, recorded per row (NaN where unscored).
    rewards = trainer._batch.adversarial_rewards.tolist()
    demo_rows = [i for i, is_demo in enumerate(trainer._batch.is_demonstration) if is_demo]
    assert 0 < len(demo_rows) < len(rewards)
    scorer = initial_model if score_in_update_pass else discriminator.model.eval()
    with torch.no_grad():
        expected = torch.cat([scorer(**batch).logits[:, 0] for batch in calls["update_fake"]])
    demo_rewards = torch.tensor([rewards[i] for i in demo_rows])
    torch.testing.assert_close(demo_rewards, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        after = torch.cat([discriminator.model.eval()(**batch).logits[:, 0] for batch in calls["update_fake"]])
    assert not torch.allclose(after, torch.cat([initial_model(**b).logits[:, 0] for b in calls["update_fake"]]))
    num_real = sum(len(batch["input_ids"]) for batch in calls["update_real"])
    # Cheap path: one pass over the preference rows only; otherwise every completion and every expert completion.
    expected_scored = len(rewards) - len(demo_rows) if score_in_update_pass else len(rewards) + num_real
    assert calls["scored_rows"] == expected_scored
