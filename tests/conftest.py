"""Shared fixtures: a tiny local Qwen3 model and small offline datasets (no Hub, no GPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_uniapl.demo.tiny import build_tiny_model  # noqa: E402

WORDS = "the sky is blue green red apple banana cat dog runs jumps fast slow river mountain sun moon star".split()


def corpus():
    lines = []
    for i in range(400):
        lines.append(" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 12)))
    return lines


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), corpus(), vocab_size=300)


def make_prompts(n: int, conversational: bool = False, offset: int = 0) -> list:
    prompts = [
        f"Tell me about the {WORDS[(i + offset) % len(WORDS)]} and the {WORDS[(3 * i) % len(WORDS)]}" for i in range(n)
    ]
    if conversational:
        return [[{"role": "user", "content": p}] for p in prompts]
    return prompts


def make_completions(n: int, conversational: bool = False) -> list:
    completions = [f"the {WORDS[(i + 5) % len(WORDS)]} is {WORDS[(i + 2) % len(WORDS)]}" for i in range(n)]
    if conversational:
        return [[{"role": "assistant", "content": c}] for c in completions]
    return completions


@pytest.fixture
def preference_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": make_prompts(16), "topic": [WORDS[i % 5] for i in range(16)]})


@pytest.fixture
def demonstration_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})


def length_reward(completions, **kwargs):
    """Varies within a group even for a random model, so advantages are non-zero."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) / 50.0 for c in completions]


# GRPOConfig settings for a few fast CPU steps; shared by UniAPL and plain GRPO runs.
CPU_GRPO_SETTINGS = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=12,
    max_steps=3,
    learning_rate=1e-2,
    logging_steps=1,
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)


def uniapl_args(output_dir, **overrides):
    from trl_uniapl import UniAPLConfig

    # No discriminator warm-up: the tests check the adversarial term from the first step. One stage, α = 1 and
    # λ = 0.1 (the defaults these tests were written with) keep both terms large on a few steps; the defaults (the
    # staged SFT -> A-GRPO) have their own tests.
    settings = {
        **CPU_GRPO_SETTINGS,
        "sft_warmup_steps": 0,
        "sft_coef": 1.0,
        "adversarial_coef": 0.1,
        "discriminator_learning_rate": 1e-2,
        "discriminator_warmup_steps": 0,
        **overrides,
    }
    return UniAPLConfig(output_dir=str(output_dir), **settings)


def build_uniapl(output_dir, model_path, train, demonstrations=None, reward=length_reward, **trainer_kwargs):
    """A UniAPLTrainer on the shared CPU settings: `trainer_kwargs` that are UniAPLTrainer arguments (e.g.
    `peft_config`, `discriminator`) go to the trainer, the rest override `uniapl_args`."""
    from trl_uniapl import UniAPLTrainer

    trainer_arguments = ("peft_config", "discriminator", "eval_dataset", "quantization_config")
    extra = {name: trainer_kwargs.pop(name) for name in trainer_arguments if name in trainer_kwargs}
    return UniAPLTrainer(
        model=model_path,
        reward_funcs=reward,
        args=uniapl_args(output_dir, **trainer_kwargs),
        train_dataset=train,
        demonstration_dataset=demonstrations,
        **extra,
    )
