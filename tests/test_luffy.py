"""LUFFY (arXiv 2504.14945), `expert_in_group=True`: the expert's completion replaces the last rollout of each
demonstration prompt's GRPO group, is rewarded and normalised with its group, and its tokens get the shaped, unclipped
off-policy gradient −A·∇f(π_θ), f(x) = x/(x + γ), normalised as TRL normalises any token of the loss type."""

import math

import pytest
import torch
from conftest import WORDS, build_uniapl, length_reward, make_completions, make_prompts, uniapl_args
from datasets import Dataset

from trl_uniapl import UniAPLConfig, UniAPLTrainer
from trl_uniapl.luffy import EXPERT_MASK_KEY

NUM_GENERATIONS = 4
# No SFT term and no discriminator unless a test asks for them: the policy-gradient term alone.
LUFFY = dict(expert_in_group=True, sft_coef=0.0, adversarial_coef=0.0)


@pytest.fixture
def demonstrations() -> Dataset:
    return Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})


@pytest.fixture
def preferences() -> Dataset:
    return Dataset.from_dict({"prompt": make_prompts(16), "topic": [WORDS[i % 5] for i in range(16)]})


class RecordingReward:
    """A reward that varies with the completion's length (non-zero advantages) and records what it scored."""

    __name__ = "recording_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        rewards = length_reward(completions)
        self.calls.append({"completions": completions, "completion_ids": completion_ids, "rewards": rewards})
        return rewards


def build(tmp_path, model_path, preferences, demonstrations, reward=None, **overrides):
    return build_uniapl(
        tmp_path, model_path, preferences, demonstrations, reward=reward or length_reward, **{**LUFFY, **overrides}
    )


def generation_batch(trainer):
    """One training generation batch, as `_prepare_inputs` gets it: its rows and TRL's (unshuffled) output."""
    trainer.model.train()
    rows = next(iter(trainer.get_train_dataloader()))
    return rows, trainer._generate_and_score_completions(rows)


def expert_token_ids(trainer, completion: str) -> list[int]:
    tokenizer = trainer.processing_class
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[: trainer.max_completion_length]


def completion_rows(output) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])]


# The batch: which row, which tokens, which advantage


def test_expert_row_carries_the_expert_tokens(tmp_path, tiny_model_path, preferences, demonstrations):
    reward = RecordingReward()
    trainer = build(tmp_path, tiny_model_path, preferences, demonstrations, reward=reward)
    rows, output = generation_batch(trainer)
    scored = reward.calls[-1]
    expert_mask = output[EXPERT_MASK_KEY].tolist()
    tokens = completion_rows(output)

    num_demonstration_groups = 0
    for start in range(0, len(rows), NUM_GENERATIONS):
        group = range(start, start + NUM_GENERATIONS)
        completion = rows[start].get("completion")
        if completion is None:  # preference prompt: every row is the policy's
            assert not any(expert_mask[row] for row in group)
            continue
        num_demonstration_groups += 1
        expert = expert_token_ids(trainer, completion)
        last = start + NUM_GENERATIONS - 1
        # Exactly one row per demonstration group, the last, carries the expert's token ids, in the reward
        # functions' view (ids and decoded text) and in TRL's batch.
        assert [expert_mask[row] for row in group] == [False] * (NUM_GENERATIONS - 1) + [True]
        assert list(scored["completion_ids"][last]) == expert == tokens[last]
        assert scored["completions"][last] == completion
        for row in group[:-1]:
            assert list(scored["completion_ids"][row]) != expert
    assert num_demonstration_groups == 1  # demonstration_ratio 0.5 of 2 prompts
    # The SFT term's tokenization is the one the expert row carries.
    assert trainer._batch.expert_ids[last] == expert
    # Preference rows: the policy's own rollouts, none of them an expert completion.
    experts = {tuple(expert_token_ids(trainer, c)) for c in demonstrations["completion"]}
    for row, is_expert in enumerate(expert_mask):
        if not is_expert:
            assert tuple(tokens[row]) not in experts


def test_expert_row_gets_its_group_relative_advantage(tmp_path, tiny_model_path, preferences, demonstrations):
    reward = RecordingReward()
    trainer = build(tmp_path, tiny_model_path, preferences, demonstrations, reward=reward)
    _, output = generation_batch(trainer)
    rewards = torch.tensor(reward.calls[-1]["rewards"]).view(-1, NUM_GENERATIONS)
    # TRL's formula (scale_rewards="group"): (r - group mean) / (group std + 1e-4), on the expert's reward too.
    expected = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(output["advantages"], expected, rtol=1e-5, atol=1e-6)
    expert = output[EXPERT_MASK_KEY]
    assert expert.sum() == 1 and output["advantages"][expert].abs().item() > 0.1
    metrics = trainer._metrics["train"]
    assert metrics["luffy/expert_advantage"][-1] == pytest.approx(output["advantages"][expert].item(), rel=1e-5)
    assert metrics["luffy/expert_reward"][-1] == pytest.approx(reward.calls[-1]["rewards"][expert.nonzero().item()])


def test_evaluation_batches_have_no_expert_row(tmp_path, tiny_model_path, preferences, demonstrations):
    trainer = build(tmp_path, tiny_model_path, preferences, demonstrations)
    trainer.model.eval()
    rows = next(iter(trainer.get_train_dataloader()))
    output = trainer._generate_and_score_completions(rows)
    assert EXPERT_MASK_KEY not in output
    experts = {tuple(expert_token_ids(trainer, c)) for c in demonstrations["completion"]}
    assert not experts & {tuple(ids) for ids in completion_rows(output)}


# The gradient, by hand


def policy_logps(model, inputs, temperature):
    """A separate forward pass: log π_θ of every completion token."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1].float()
    logps = torch.log_softmax(logits / temperature, dim=-1)
    return logps.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def normalise(trainer, per_token, mask, num_items):
    """TRL's aggregation of the per-token loss for each loss type (its docs), inside an accumulation window."""
    accumulation = trainer.current_gradient_accumulation_steps
    loss_type = trainer.loss_type
    rows = per_token.shape[0]
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (rows * trainer.max_completion_length) / accumulation
    if loss_type == "luspo":
        return (per_token * mask).sum(1).mean() / accumulation
    assert loss_type in ("dapo", "cispo", "vespo")
    tokens = num_items.float() / trainer.accelerator.num_processes
    return (per_token * mask).sum() / (tokens * accumulation / trainer.args.steps_per_generation)


def luffy_surrogate(trainer, inputs, luffy=True):
    """A loss whose gradient is the one LUFFY prescribes at the first iteration (every ratio 1): −c·A·∇log π_θ on the
    policy's rows (+ β·k3 KL), −c·A·∇f(π_θ) on the expert rows, f(x) = x/(x+γ), no KL; c = min(1, ε_high) for cispo.
    With `luffy=False`, what plain GRPO would give the expert row (−c·A·∇log π_θ and the KL)."""
    logps = policy_logps(trainer.model, inputs, trainer.temperature)
    advantages = inputs["advantages"].unsqueeze(1)
    mask = inputs["completion_mask"].float()
    expert = inputs[EXPERT_MASK_KEY].unsqueeze(1)
    scale = min(1.0, trainer.epsilon_high) if trainer.loss_type == "cispo" else 1.0
    on_policy = -scale * advantages * torch.exp(logps - logps.detach())
    if trainer.beta != 0.0:
        ref = inputs["ref_per_token_logps"]
        on_policy = on_policy + trainer.beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    probs = logps.exp()
    gamma = trainer.args.expert_shaping_gamma
    shaped = probs / (probs + gamma) if gamma is not None else probs
    off_policy = -scale * advantages * shaped
    per_token = torch.where(expert, off_policy, on_policy) if luffy else on_policy
    return normalise(trainer, per_token, mask, inputs["num_items_in_batch"])


def gradients(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def assert_luffy_gradient(trainer, inputs):
    assert inputs[EXPERT_MASK_KEY].any() and inputs["advantages"][inputs[EXPERT_MASK_KEY]].abs().max() > 0.05
    actual = gradients(trainer.model, trainer.compute_loss(trainer.model, inputs))
    expected = gradients(trainer.model, luffy_surrogate(trainer, inputs))
    plain = gradients(trainer.model, luffy_surrogate(trainer, inputs, luffy=False))
    scale = expected.abs().max()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale.item())
    # The check is sharp: LUFFY's expert term changes the gradient far beyond the tolerance.
    assert (plain - expected).abs().max() > 1e-2 * scale


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": "grpo"},
        {"loss_type": "bnpo"},
        {"loss_type": "dr_grpo"},
        {"loss_type": "dapo"},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "luspo"},
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "sapo"},
        {"loss_type": "vespo"},
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},  # GSPO
        {"loss_type": "dapo", "importance_sampling_level": "sequence"},
        {"loss_type": "dapo", "expert_shaping_gamma": None},  # plain ratio π_θ
        {"loss_type": "grpo", "beta": 0.1},  # KL on the policy's rows only
        {"loss_type": "dapo", "beta": 0.1, "use_bias_correction_kl": True},
        {"loss_type": "dapo", "off_policy_mask_threshold": 0.0, "delta": 1.5},
    ],
    ids=lambda settings: "-".join(f"{k}={v}" for k, v in settings.items()),
)
def test_expert_gradient_matches_hand_computation(tmp_path, tiny_model_path, preferences, demonstrations, settings):
    trainer = build(tmp_path, tiny_model_path, preferences, demonstrations, **settings)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if trainer.beta != 0.0:
        assert (inputs["ref_per_token_logps"][inputs[EXPERT_MASK_KEY]] == 0).all()
    assert_luffy_gradient(trainer, inputs)
    metrics = trainer._metrics["train"]
    assert 0 < metrics["luffy/expert_ratio"][-1] < 1 and metrics["luffy/expert_shaped_weight"][-1] > 0


def test_gradient_with_gradient_accumulation(tmp_path, tiny_model_path, preferences, demonstrations):
    trainer = build(
        tmp_path, tiny_model_path, preferences, demonstrations, loss_type="dapo", gradient_accumulation_steps=2
    )
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    rows = next(iter(trainer.get_train_dataloader()))
    assert len(rows) == 16  # 4 prompts, 2 of them demonstrations
    trainer._prepare_inputs(rows)
    micro_batches = trainer._buffered_inputs
    assert sum(int(batch[EXPERT_MASK_KEY].sum()) for batch in micro_batches) == 2
    assert_luffy_gradient(trainer, next(batch for batch in micro_batches if batch[EXPERT_MASK_KEY].any()))


def test_second_iteration_recomputes_the_expert_ratio(tmp_path, tiny_model_path, preferences, demonstrations):
    """num_iterations=2: the batch's old log-probabilities are from generation time, except on the expert row (0):
    at the second iteration its ratio is π_θ/π_φ of the CURRENT policy, unclipped, while the policy's rows keep TRL's
    clipped ratio to the generation-time policy. Checked as the gradient of the expert row alone: the loss minus the
    same loss with the expert's advantage set to 0 (every loss type is 0 at A = 0)."""
    trainer = build(
        tmp_path,
        tiny_model_path,
        preferences,
        demonstrations,
        loss_type="dapo",
        num_iterations=2,
        max_steps=1,
        off_policy_mask_threshold=0.0,
    )
    trainer.train()  # the first iteration; the model moved
    trainer.model.train()
    inputs = trainer._buffered_inputs[0]
    expert, mask = inputs[EXPERT_MASK_KEY], inputs["completion_mask"].bool()
    assert (inputs["old_per_token_logps"][expert] == 0).all()
    policy_tokens = mask & ~expert.unsqueeze(1)
    assert (inputs["old_per_token_logps"][policy_tokens] < 0).all()  # generation-time log-probabilities

    without_expert = dict(inputs, advantages=inputs["advantages"].masked_fill(expert, 0.0))
    actual = gradients(trainer.model, trainer.compute_loss(trainer.model, inputs)) - gradients(
        trainer.model, trainer.compute_loss(trainer.model, without_expert)
    )
    logps = policy_logps(trainer.model, inputs, trainer.temperature)
    probs = logps.exp()
    # The policy moved since generation: a ratio to the generation-time policy would not be 1.
    assert (logps - inputs["old_per_token_logps"])[policy_tokens].abs().max() > 1e-3
    shaped = probs / (probs + 0.1)
    per_token = torch.where(expert.unsqueeze(1), -inputs["advantages"].unsqueeze(1) * shaped, torch.zeros_like(probs))
    expected = gradients(
        trainer.model, normalise(trainer, per_token, inputs["completion_mask"].float(), inputs["num_items_in_batch"])
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# Training end to end: num_iterations, gradient accumulation, discriminator, resume


def test_trains_with_iterations_accumulation_and_discriminator(tmp_path, tiny_model_path, preferences, demonstrations):
    trainer = build(
        tmp_path,
        tiny_model_path,
        preferences,
        demonstrations,
        num_iterations=2,
        gradient_accumulation_steps=2,
        sft_coef=1.0,
        adversarial_coef=0.1,
        max_steps=2,
    )
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    # Advantage and reward are logged when the batch is generated (step 1), the ratio at every loss (both iterations).
    for key in ("luffy/expert_advantage", "luffy/expert_reward"):
        assert math.isfinite(logs[0][key]) and key not in logs[1], key
    for key in ("luffy/expert_ratio", "luffy/expert_shaped_weight"):
        assert all(math.isfinite(entry[key]) and entry[key] > 0 for entry in logs), key
    # The second iteration scores the expert tokens with the updated policy.
    assert logs[1]["luffy/expert_ratio"] != pytest.approx(logs[0]["luffy/expert_ratio"], rel=1e-3)


def test_discriminator_never_sees_the_expert_row_as_a_policy_sample(
    tmp_path, tiny_model_path, preferences, demonstrations
):
    trainer = build(tmp_path, tiny_model_path, preferences, demonstrations, adversarial_coef=0.1)
    fakes = []
    update = trainer.discriminator.update

    def recorded_update(real_batches, fake_batches, *args, **kwargs):
        fakes.extend(
            ids[mask.bool()].tolist() for batch in fake_batches for ids, mask in zip(*batch.values(), strict=True)
        )
        return update(real_batches, fake_batches, *args, **kwargs)

    trainer.discriminator.update = recorded_update
    rows, output = generation_batch(trainer)
    expert = output[EXPERT_MASK_KEY]
    batch = trainer._batch
    expert_rows = expert.nonzero().view(-1).tolist()
    demo_rows = [row for row, is_demo in enumerate(batch.is_demonstration) if is_demo]
    # Fake samples: the policy's completions of the demonstration prompts, not the expert row.
    assert len(fakes) == len(demo_rows) - len(expert_rows) == NUM_GENERATIONS - 1
    for row in expert_rows:
        assert batch.prompt_ids[row] + batch.expert_ids[row] not in fakes
    # No adversarial reward nor advantage on the expert row; the policy's rows are scored.
    assert torch.isnan(batch.adversarial_rewards[expert]).all()
    assert (batch.adversarial_advantages[expert] == 0).all()
    assert torch.isfinite(batch.adversarial_rewards[~expert]).all()
    assert batch.adversarial_advantages[~expert].abs().max() > 0


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model_path, preferences, demonstrations):
    from test_resume import assert_same_logs, assert_same_policy, step_logs

    def run(output_dir, resume=None):
        trainer = build(
            output_dir, tiny_model_path, preferences, demonstrations, max_steps=4, save_strategy="steps", save_steps=2
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    reference = run(tmp_path / "uninterrupted")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "uninterrupted" / "checkpoint-2"))
    assert "luffy/expert_ratio" in step_logs(reference)[3]
    assert_same_logs(step_logs(reference), step_logs(resumed), [3, 4])
    assert_same_policy(reference, resumed)


# vLLM's importance sampling, with a stand-in for vLLM (the policy's sampled tokens with perturbed log-probabilities)


class FakeVLLM:
    """Returns completions of random tokens ending in eos, with log-probabilities that are not the policy's, so that
    TRL's vLLM importance-sampling ratio is far from 1 on the policy's rollouts."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.generator = torch.Generator().manual_seed(0)

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler):
        vocab = len(self.trainer.processing_class)
        eos = self.trainer.processing_class.eos_token_id
        completion_ids, logprobs = [], []
        for _ in prompts:
            length = int(torch.randint(3, 8, (1,), generator=self.generator))
            ids = torch.randint(10, vocab, (length,), generator=self.generator).tolist() + [eos]
            completion_ids.append(ids)
            logprobs.append([[-float(torch.rand(1, generator=self.generator)) * 3 - 4] for _ in ids])
        return None, completion_ids, logprobs, None


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_vllm_importance_sampling_is_one_on_the_expert_row(
    tmp_path, tiny_model_path, preferences, demonstrations, mode
):
    trainer = build(
        tmp_path,
        tiny_model_path,
        preferences,
        demonstrations,
        loss_type="dapo",
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=3.0,
        off_policy_mask_threshold=0.0,
    )
    # TRL's vLLM code path, on CPU: generation is the stand-in's, everything downstream is TRL's.
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer.vllm_generation, trainer._last_loaded_step = FakeVLLM(trainer), trainer.state.global_step
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    expert = inputs[EXPERT_MASK_KEY]
    assert expert.sum() == 1
    ratio = inputs["importance_sampling_ratio"]
    assert (ratio[expert] == 1).all() and (inputs["sampling_per_token_logps"][expert] == 0).all()
    assert (inputs["old_per_token_logps"][expert] == 0).all()
    assert not torch.allclose(ratio[~expert], torch.ones_like(ratio[~expert]))  # the stand-in is off-policy
    # The expert row alone (loss minus the loss at A_E = 0): LUFFY's gradient, not scaled by any sampling ratio.
    without_expert = dict(inputs, advantages=inputs["advantages"].masked_fill(expert, 0.0))
    actual = gradients(trainer.model, trainer.compute_loss(trainer.model, inputs)) - gradients(
        trainer.model, trainer.compute_loss(trainer.model, without_expert)
    )
    probs = policy_logps(trainer.model, inputs, trainer.temperature).exp()
    per_token = torch.where(
        expert.unsqueeze(1), -inputs["advantages"].unsqueeze(1) * probs / (probs + 0.1), torch.zeros_like(probs)
    )
    expected = gradients(
        trainer.model, normalise(trainer, per_token, inputs["completion_mask"].float(), inputs["num_items_in_batch"])
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# Refusals


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"demonstration_ratio": 0.0}, r"`demonstration_ratio=0` draws none"),
        ({"num_generations": 1, "per_device_train_batch_size": 4}, r"at least 2 generations"),
        ({"expert_shaping_gamma": 0.0}, r"`expert_shaping_gamma` must be a finite number > 0"),
        ({"expert_shaping_gamma": -1.0}, r"`expert_shaping_gamma` must be a finite number > 0"),
        ({"loss_type": "cispo"}, r"Set `epsilon_high` >= 1"),
        ({"loss_type": "cispo", "epsilon_high": 0.5}, r"Set `epsilon_high` >= 1"),
        ({"delta": 1.0}, r"`delta=1.0` clips the ratio"),
    ],
)
def test_config_refusals(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        uniapl_args(tmp_path, **{**LUFFY, **settings})


def test_config_accepts_luffy_defaults(tmp_path):
    args = uniapl_args(tmp_path, expert_in_group=True)
    assert args.expert_shaping_gamma == 0.1
    assert not UniAPLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none").expert_in_group
    uniapl_args(tmp_path, **LUFFY, loss_type="cispo", epsilon_high=5.0, expert_shaping_gamma=None)


def test_refused_without_demonstrations(tmp_path, tiny_model_path, preferences):
    with pytest.raises(ValueError, match=r"`expert_in_group=True` .* no demonstrations were given"):
        UniAPLTrainer(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=uniapl_args(tmp_path, **LUFFY),
            train_dataset=preferences,
        )


def test_refused_with_tools_or_rollout_func(tmp_path, tiny_model_path, preferences, demonstrations):
    def rollout_func(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"does not support tools, `environment_factory` or `rollout_func`"):
        UniAPLTrainer(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=uniapl_args(tmp_path, **LUFFY),
            train_dataset=preferences,
            demonstration_dataset=demonstrations,
            rollout_func=rollout_func,
        )


def test_option_off_changes_nothing(tmp_path, tiny_model_path, preferences, demonstrations):
    """With `expert_in_group=False` (the default), the same run as before the option existed: no expert row, no
    LUFFY key or metric, the same losses with and without an explicit `expert_in_group=False`."""
    # Built and trained one after the other: each trainer seeds the global random state when it is built.
    default = build_uniapl(tmp_path / "a", tiny_model_path, preferences, demonstrations, sft_coef=1.0, max_steps=2)
    default.train()
    explicit = build_uniapl(
        tmp_path / "b",
        tiny_model_path,
        preferences,
        demonstrations,
        sft_coef=1.0,
        max_steps=2,
        expert_in_group=False,
        expert_shaping_gamma=0.5,
    )
    explicit.train()
    assert default._luffy is None and explicit._luffy is None
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (default, explicit)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert not any(key.startswith("luffy/") for entry in default.state.log_history for key in entry)


# Two processes (torchrun, gloo): the groups span processes; the expert row is the last of its group over both


@pytest.fixture(scope="module")
def distributed_reports(tiny_model_path, tmp_path_factory):
    import json
    import os
    import signal
    import subprocess

    from test_distributed import free_port, torchrun_command

    out_dir = tmp_path_factory.mktemp("luffy-distributed")
    script = os.path.join(os.path.dirname(__file__), "scripts", "luffy_distributed.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["OMP_NUM_THREADS"] = "1"
    command = torchrun_command() + [
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        script,
        tiny_model_path,
        str(out_dir),
        "2",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}"
    reports = []
    for rank in range(2):
        with open(out_dir / f"rank{rank}.json") as f:
            reports.append(json.load(f))
    return reports


def test_two_processes_expert_row_is_the_last_of_its_group(distributed_reports):
    assert [report["world_size"] for report in distributed_reports] == [2, 2]
    assert distributed_reports[0]["policy_hash"] == distributed_reports[1]["policy_hash"]
    num_batches = len(distributed_reports[0]["batches"])
    assert num_batches == 2
    spanning_experts = 0
    for index in range(num_batches):
        batches = [report["batches"][index] for report in distributed_reports]
        rows_per_rank = len(batches[0]["expert"])
        merged = {key: [value for batch in batches for value in batch[key]] for key in batches[0]}
        assert len(merged["expert"]) == 12  # 6 rows per rank, groups of 4: rows 4-7 span the two ranks
        for start in range(0, 12, NUM_GENERATIONS):
            group = range(start, start + NUM_GENERATIONS)
            demonstration = merged["is_demonstration"][start]
            assert all(merged["is_demonstration"][row] == demonstration for row in group)
            expected = [False] * (NUM_GENERATIONS - 1) + [demonstration]
            assert [merged["expert"][row] for row in group] == expected
            if demonstration:
                last = start + NUM_GENERATIONS - 1
                assert merged["completion_ids"][last] == merged["expert_ids"][last]
                assert merged["adversarial_advantages"][last] == 0.0
                spanning_experts += start // rows_per_rank != last // rows_per_rank
        # The advantages are TRL's group-relative ones over the rewards of both ranks, the expert's included (plus
        # λ·A_adv, λ = 0.1, which is 0 on the expert rows).
        rewards = torch.tensor(merged["rewards"]).view(-1, NUM_GENERATIONS)
        task = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        expected = task + 0.1 * torch.tensor(merged["adversarial_advantages"])
        torch.testing.assert_close(torch.tensor(merged["advantages"]), expected, rtol=1e-5, atol=1e-6)
    assert spanning_experts >= 1, "no demonstration group spanned the two ranks: weak test"
    # LUFFY's metrics are reduced over the ranks: both log the same values.
    logs = [[entry for entry in report["log_history"] if "loss" in entry] for report in distributed_reports]
    for mine, theirs in zip(*logs):
        for key in ("luffy/expert_advantage", "luffy/expert_reward", "luffy/expert_ratio"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
