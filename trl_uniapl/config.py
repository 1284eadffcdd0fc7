"""Configuration of the UniAPL trainer: GRPOConfig plus the SFT, adversarial and discriminator knobs."""

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from .luffy import validate_config as validate_luffy

SFT_COEF_SCHEDULES = ("constant", "linear", "cosine")
ADVERSARIAL_REWARDS = ("gail", "airl", "logd", "score")
BCE_ONLY_ADVERSARIAL_REWARDS = ("gail", "airl", "logd")
LOG_2 = math.log(2.0)
ADVERSARIAL_COEF_MODES = ("fixed", "lagrangian")
ADVERSARIAL_REWARD_SCOPES = ("all", "demonstrations")
DISCRIMINATOR_LOSSES = ("bce", "bt")
DISCRIMINATOR_TYPES = ("shared", "frozen_copy", "full_copy")


@dataclass
class UniAPLConfig(GRPOConfig):
    r"""
    Configuration class for the [`UniAPLTrainer`].

    Everything [`~trl.GRPOConfig`] accepts is accepted here and means the same thing. The extra fields configure the
    three terms UniAPL adds to GRPO (see `method.md` and `docs/guide.md`, "What it optimises", for the objective and
    which parts of it are a reconstruction of arXiv 2509.25148):

        L(θ) = L_GRPO(θ; A_task + λ·A_adv) + α(t)·L_SFT(θ; expert completions)

    A_task is TRL's advantage of the task rewards alone; A_adv is the discriminator's reward centred within each group
    of `num_generations` completions and divided by its standard deviation over the batch (see
    [`~trl_uniapl.discriminator.group_relative_advantages`]), so λ is its weight relative to a unit-scale A_task.

    Parameters:
        > Parameters that control the SFT term α(t)·L_SFT

        sft_coef (`float`, *optional*, defaults to `0.0`):
            Peak weight α of the negative log-likelihood of the expert completions after the SFT-only warm-up
            (`sft_warmup_steps`). `0.0` (the default): no SFT term once the policy phase starts, which with the
            default warm-up is the staged SFT → A-GRPO, the best method per second of training the quality benchmark
            measured (docs/benchmarks.md). The one-stage UniAPL is `sft_warmup_steps=0` with `sft_coef > 0`: α 3
            measured best (validation 25.5% against 23.0% at α 1 and 15.5% at 0.3; on test it ties the staged method
            at 1.8× its train time).
        sft_coef_schedule (`str`, *optional*, defaults to `"constant"`):
            How α evolves with the optimizer step, CHORD-style (arXiv 2508.11408): `"constant"`, `"linear"` or
            `"cosine"` decay from `sft_coef` to `sft_coef_final` over the steps after the warm-up.
        sft_coef_warmup_steps (`int`, *optional*, defaults to `0`):
            Steps over which α rises linearly from 0 to `sft_coef` (all schedules).
        sft_coef_final (`float`, *optional*, defaults to `0.0`):
            Value α decays to at the last step with the `"linear"` and `"cosine"` schedules.
        sft_per_device_train_batch_size (`int` or `None`, *optional*, defaults to `16`):
            Demonstrations the SFT term reads per process at every micro-step, from a sampler of its own over the
            demonstration set (seeded, reshuffled every epoch, sharded across processes, independent of which
            prompts are rolled out); an optimizer step reads `sft_per_device_train_batch_size ×
            gradient_accumulation_steps × num_processes` demonstrations. `None`: the SFT term reads only the expert
            completions of the demonstration prompts in the generation batch (the behaviour before this option: 2
            demonstrations per optimizer step at 4 prompts × 8 generations and `demonstration_ratio=0.5`).
        sft_warmup_steps (`float`, *optional*, defaults to `0.5`):
            First optimizer steps that are SFT only: no generation, no reward call, no GRPO loss, no discriminator
            update, the SFT term at weight 1. Then the full objective. An integer ≥ 1 is a number of steps; a float
            in (0, 1) is a share of the run's steps (rounded up), as transformers' `warmup_steps` reads it:
            `sft_warmup_steps=0.5` is half the run whatever `max_steps` or the epochs make it. With `sft_coef=0`
            afterwards this is the paper's staged SFT → A-GRPO in one run; with `sft_coef > 0`, CHORD's SFT warm-up.
            Not to be confused with `sft_coef_warmup_steps` (a ramp of α). Needs `sft_per_device_train_batch_size`.
            The default, half the run, is where the quality benchmark measured the staged method (docs/benchmarks.md,
            "Where to switch"). Without demonstrations there is no warm-up: the run is GRPO's.
        sft_warmup_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Constant learning rate of the SFT-only warm-up (`None`: `learning_rate`). With a warm-up, the configured
            schedule (`lr_scheduler_type`, `warmup_steps` / `warmup_ratio`) runs over the policy steps after it, as
            for an SFT run followed by a GRPO run.

        > Parameters that control the adversarial reward λ·r_adv

        adversarial_coef (`float`, *optional*, defaults to `0.1`):
            Weight λ of the adversarial advantage A_adv, added to the task advantage after TRL's normalisation:
            A = A_task + λ·A_adv, both of unit scale. In `"lagrangian"` mode this is the initial value of the
            multiplier. `0.0` (with `"fixed"` mode) disables the discriminator. The default 0.1 is not a measured
            optimum: the λ sweep of the quality protocol (`--regime lambda_sweep`) has not run yet
            (docs/benchmarks.md).
        adversarial_reward (`str` or `None`, *optional*, defaults to `None`):
            Reward computed from the discriminator's logit s = logit D: `"gail"` (−log(1−D)), `"airl"` (s), `"logd"`
            (log D) or `"score"` (s minus the batch's mean expert logit). `None` means `"gail"` with
            `discriminator_loss="bce"` and `"score"` with `"bt"`, whose logits have an arbitrary offset (only
            `"score"` is accepted with `"bt"`).
        adversarial_reward_clip (`float` or `None`, *optional*, defaults to `5.0`):
            The adversarial reward is clipped to `[-clip, clip]`. `None` disables clipping.
        adversarial_reward_scope (`str`, *optional*, defaults to `"all"`):
            Which completions receive the adversarial reward: `"all"` (every prompt, so the expert's style shapes
            exploration everywhere) or `"demonstrations"` (only prompts that have an expert completion).
        adversarial_coef_mode (`str`, *optional*, defaults to `"fixed"`):
            `"fixed"` keeps λ at `adversarial_coef`; `"lagrangian"` runs dual ascent
            λ ← clip(λ + adversarial_coef_lr·(ĴS − divergence_target), 0, adversarial_coef_max) after every
            discriminator update once `discriminator_warmup_steps` are over, with ĴS the Jensen–Shannon estimate from
            that update's forward pass (clamped at 0).
            The λ a batch's advantages used is the one logged as `adversarial/coef`. Needs
            `discriminator_loss="bce"` (a Bradley–Terry logit does not give D's probability).
        divergence_target (`float`, *optional*, defaults to `0.1`):
            Constraint level ε on the Jensen–Shannon divergence (in nats, between 0 and log 2) for `"lagrangian"`.
        adversarial_coef_lr (`float`, *optional*, defaults to `0.05`):
            Dual learning rate η_λ for `"lagrangian"`.
        adversarial_coef_max (`float`, *optional*, defaults to `1.0`):
            Upper bound on λ for `"lagrangian"`.

        > Parameters that control the discriminator D_φ

        discriminator_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Checkpoint of the discriminator, loaded with `AutoModelForSequenceClassification(num_labels=1)`. `None`
            uses the policy's own checkpoint.
        discriminator_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments for the discriminator's `from_pretrained` (e.g. `{"dtype": "bfloat16"}`). Accepts a JSON
            string on the command line. When the policy is quantized and these kwargs hold no `quantization_config`,
            the discriminator gets the policy's quantization.
        discriminator_loss (`str`, *optional*, defaults to `"bce"`):
            `"bce"`: −log D(x, y_E) − log(1 − D(x, y_π)) (GAIL); `"bt"`: −log σ(s(x, y_E) − s(x, y_π)) on pairs of an
            expert completion and a policy completion of the same prompt (Bradley–Terry, GAD arXiv 2511.10643). The
            bt loss sees only score differences, so its metrics are pairwise (`discriminator/pairwise_acc`,
            `discriminator/score_gap`) and its reward is `"score"`.
        discriminator_learning_rate (`float`, *optional*, defaults to `1e-5`):
            Learning rate of the discriminator's own AdamW optimizer.
        discriminator_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the discriminator's optimizer.
        discriminator_update_interval (`int`, *optional*, defaults to `1`):
            Policy generation batches between two discriminator updates (one update per generation batch at 1).
        discriminator_steps (`int`, *optional*, defaults to `1`):
            Discriminator optimizer steps at each update, on the same batch.
        discriminator_warmup_steps (`int`, *optional*, defaults to `16`):
            Policy optimizer steps during which the discriminator trains but the applied λ is 0, so that a randomly
            initialised score head does not steer the policy. 16 steps give at least 4 updates whenever
            `num_iterations` ≤ 4 (one update per generation batch). On the embedded task with the SFT term's own
            batch (docs/method.md) the discriminator left chance (balanced accuracy ≥ 0.6 over two updates) at its
            7th update on one seed and not within 10 on the other. λ adds nothing measurable there
            (docs/benchmarks.md), so the default stays the one every quality benchmark run used.
        discriminator_label_smoothing (`float`, *optional*, defaults to `0.0`):
            Label smoothing ε. `"bce"`: one-sided, the expert target is `1 - ε`. `"bt"`: each pair's preference
            label is `1 - ε` (conservative Bradley–Terry).
        discriminator_max_grad_norm (`float` or `None`, *optional*, defaults to `1.0`):
            Gradient clipping of the discriminator. `None` disables it.
        discriminator_score_in_update_pass (`bool`, *optional*, defaults to `True`):
            Score the expert completions and the policy's completions of demonstration prompts with the logits of the
            discriminator update's own forward pass (before its optimizer step) instead of a second forward after the
            update; only the other rows get a scoring pass (after the update). The reward keeps its definition; only
            the discriminator iterate that gives it changes (the one before this update instead of after it). The
            update's forward runs in train mode, so a discriminator with dropout scores with dropout on this path.
            `False` scores every row in eval mode after the update (one more forward pass over the batch).
        discriminator_freeze_after_updates (`int` or `None`, *optional*, defaults to `None`):
            Train the online discriminator for its first N updates, then freeze it: it keeps scoring, with no more
            updates (a fixed discriminator, everything else equal). `None`: it trains throughout.
        discriminator_collapse_patience (`int`, *optional*, defaults to `20`):
            Number of consecutive discriminator updates whose balanced accuracy (`"bce"`) or pairwise accuracy
            (`"bt"`) is ≥ 0.99 (it wins outright) or within 0.02 of 0.5 (it learns nothing) after which a collapse
            warning is logged.

        > Parameters that control what the discriminator's model is

        discriminator_type (`str` or `None`, *optional*, defaults to `None`):
            `"shared"`: a LoRA adapter and a score head on the policy's own weights (the frozen, possibly 4-bit base of
            a PEFT policy; the current weights of a fully fine-tuned one), no second model in memory. `"frozen_copy"`:
            the same adapter and head on a frozen copy of a fully fine-tuned policy's backbone in the training dtype.
            `"full_copy"`: a separate, fully trainable sequence classifier loaded from
            `discriminator_model_name_or_path` (default: the policy's checkpoint). `None` means `"shared"`, or
            `"full_copy"` when a separate discriminator is given (`discriminator_model_name_or_path`, the trainer's
            `discriminator=` or `discriminator_processing_class=`) or the policy is sharded by ZeRO-3 / FSDP.
        discriminator_lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank of the `"shared"` / `"frozen_copy"` discriminator's adapter on every linear layer of the
            backbone, when neither `discriminator_peft_config` nor the policy's `peft_config` gives LoRA settings.
        discriminator_lora_alpha (`float`, *optional*, defaults to `32.0`):
            LoRA alpha of that adapter (scaling alpha / r).

        > Parameters that control the fixed reference-conditioned discriminator (the paper's published design)

        reference_scorer (`str` or `None`, *optional*, defaults to `None`):
            A FIXED scorer instead of the online discriminator: it scores each rollout of a demonstration prompt by its
            consistency with that prompt's expert completion (the paper's modified POLAR model). `"ngram_f1"`
            (character 3-gram F1, no model), a dotted import path to a callable `(prompts, references, completions,
            **kwargs) -> list[float]`, or a local folder / Hub name of a POLAR-style
            `AutoModelForSequenceClassification` (`num_labels=1`), loaded frozen with the policy's quantization. A_adv
            is its score centred per group and scaled over the batch; λ is `adversarial_coef` (`"fixed"` mode only);
            rows without a reference (preference prompts) get A_adv = 0. The trainer's `reference_scorer=` argument
            (a callable) takes precedence. `None`: the online discriminator.
        reference_scorer_template (`str` or `None`, *optional*, defaults to `None`):
            Text template joining `{prompt}`, `{reference}` and `{completion}` for a model scorer. `None`:
            [`~trl_uniapl.reference_scorers.DEFAULT_REFERENCE_TEMPLATE`].
        reference_scorer_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            `from_pretrained` keyword arguments of a model scorer (dict or JSON string).

        > Parameters that control the data streams

        demonstration_ratio (`float` or `None`, *optional*, defaults to `None`):
            Share of the prompts of every generation batch that come from demonstrations (rolled out like any prompt,
            for the discriminator and the task reward). `None` means 0.5 when the demonstrations come as a separate
            `demonstration_dataset`, and their natural share when they are mixed into `train_dataset`. Whenever both
            kinds exist and the ratio is strictly between 0 and 1, every generation batch holds at least one prompt
            of each kind. `0` rolls out preference prompts only (needs `sft_per_device_train_batch_size`): the
            discriminator then trains on the SFT batch's expert completions (real) against the preference rollouts
            (fake), which `discriminator_loss="bce"` allows and `"bt"` (pairs of one prompt) does not.

        > Parameters that control LUFFY, the expert's completion inside the GRPO group (arXiv 2504.14945; see
        > `trl_uniapl/luffy.py`)

        expert_in_group (`bool`, *optional*, defaults to `False`):
            On every demonstration prompt of a training batch, put the expert's completion (tokenized as for the SFT
            term: ending in eos, truncated to `max_completion_length`) in place of the LAST of the `num_generations`
            rollouts of that prompt's group. The task rewards score it like any completion and it enters its group's
            advantage normalisation; its tokens get LUFFY's off-policy gradient −A·∇f(π_θ) (ratio π_θ/π_φ with
            π_φ = 1, shaped by f, never clipped), normalised as TRL normalises any token of `loss_type`. The
            discriminator does not count it as a policy sample (no fake sample, A_adv = 0). Needs demonstrations,
            `num_generations` >= 2 and `demonstration_ratio` > 0; refused with tools, `environment_factory`,
            `rollout_func`, `loss_type='cispo'` with `epsilon_high` < 1 and `delta` <= 1. Evaluation batches are
            unchanged.
        expert_shaping_gamma (`float` or `None`, *optional*, defaults to `0.1`):
            γ of LUFFY's policy-shaping function f(x) = x/(x + γ) applied to the expert tokens' ratio π_θ, which
            weighs up the gradient of low-probability expert tokens. `None` disables shaping (f(x) = x, the plain
            ratio π_θ).
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["discriminator_init_kwargs", "reference_scorer_init_kwargs"]

    # SFT term
    sft_coef: float = field(
        default=0.0,
        metadata={
            "help": "Peak weight alpha of the NLL of the expert completions after the SFT-only warm-up. 0 (default): "
            "none, the staged SFT -> A-GRPO; 1 with sft_warmup_steps=0: the one-stage UniAPL."
        },
    )
    sft_coef_schedule: str = field(
        default="constant",
        metadata={
            "help": "Schedule of alpha: 'constant', 'linear' or 'cosine' decay to `sft_coef_final`.",
            "choices": list(SFT_COEF_SCHEDULES),
        },
    )
    sft_coef_warmup_steps: int = field(
        default=0, metadata={"help": "Steps over which alpha rises linearly from 0 to `sft_coef`."}
    )
    sft_coef_final: float = field(
        default=0.0, metadata={"help": "Value alpha decays to at the last step ('linear' and 'cosine' schedules)."}
    )
    sft_per_device_train_batch_size: int | None = field(
        default=16,
        metadata={
            "help": "Demonstrations the SFT term reads per process and micro-step, from a sampler of its own over the "
            "demonstrations (an optimizer step reads this x gradient_accumulation_steps x processes). None: only the "
            "expert completions of the demonstration prompts in the generation batch."
        },
    )
    sft_warmup_steps: float = field(
        default=0.5,
        metadata={
            "help": "First optimizer steps that are SFT only (no generation, reward, GRPO loss or discriminator): an "
            "integer >= 1 of steps, or a float in (0, 1), a share of the run's steps (rounded up). With sft_coef=0 "
            "after them: the staged SFT -> A-GRPO in one run."
        },
    )
    sft_warmup_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Constant learning rate of the SFT-only warm-up (None: learning_rate); the configured schedule "
            "then runs over the policy steps."
        },
    )

    # Adversarial term
    adversarial_coef: float = field(
        default=0.1,
        metadata={
            "help": "Weight lambda of the adversarial advantage, A = A_task + lambda * A_adv (initial value in "
            "'lagrangian' mode). 0 with 'fixed' mode disables the discriminator."
        },
    )
    adversarial_reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward from the discriminator: 'gail' (-log(1-D)), 'airl' (logit D), 'logd' (log D) or 'score' "
            "(logit minus the mean expert logit). None: 'gail' with the 'bce' loss, 'score' with 'bt'.",
            "choices": list(ADVERSARIAL_REWARDS),
        },
    )
    adversarial_reward_clip: float | None = field(
        default=5.0, metadata={"help": "Clip the adversarial reward to [-clip, clip]. None disables clipping."}
    )
    adversarial_reward_scope: str = field(
        default="all",
        metadata={
            "help": "Completions that get the adversarial reward: 'all' or only 'demonstrations' prompts.",
            "choices": list(ADVERSARIAL_REWARD_SCOPES),
        },
    )
    adversarial_coef_mode: str = field(
        default="fixed",
        metadata={
            "help": "'fixed' lambda, or 'lagrangian' dual ascent on the discriminator's Jensen-Shannon estimate.",
            "choices": list(ADVERSARIAL_COEF_MODES),
        },
    )
    divergence_target: float = field(
        default=0.1, metadata={"help": "Constraint level epsilon on the JS divergence (nats, in [0, log 2])."}
    )
    adversarial_coef_lr: float = field(default=0.05, metadata={"help": "Dual learning rate of lambda."})
    adversarial_coef_max: float = field(default=1.0, metadata={"help": "Upper bound on lambda in 'lagrangian'."})

    # Discriminator
    discriminator_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Discriminator checkpoint (AutoModelForSequenceClassification, num_labels=1). None: the policy's."
        },
    )
    discriminator_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (dict or JSON string) for the discriminator's `from_pretrained`."},
    )
    discriminator_loss: str = field(
        default="bce",
        metadata={
            "help": "'bce' (GAIL) or 'bt' (Bradley-Terry on expert/policy pairs of the same prompt).",
            "choices": list(DISCRIMINATOR_LOSSES),
        },
    )
    discriminator_learning_rate: float = field(default=1e-5, metadata={"help": "Discriminator learning rate."})
    discriminator_weight_decay: float = field(default=0.0, metadata={"help": "Discriminator weight decay."})
    discriminator_update_interval: int = field(
        default=1, metadata={"help": "Generation batches between two discriminator updates."}
    )
    discriminator_steps: int = field(default=1, metadata={"help": "Discriminator optimizer steps per update."})
    discriminator_warmup_steps: int = field(
        default=16, metadata={"help": "Policy steps during which the discriminator trains but lambda is 0."}
    )
    discriminator_label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing: expert target 1-eps ('bce'), pair label 1-eps ('bt')."}
    )
    discriminator_max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Gradient clipping of the discriminator. None disables it."}
    )
    discriminator_score_in_update_pass: bool = field(
        default=True,
        metadata={
            "help": "Reuse the discriminator update's forward pass to score the expert completions and the policy's "
            "completions of demonstration prompts (scores from before that update's optimizer step, as in most GAIL "
            "implementations), instead of a second pass after the update. False: score every row after the update."
        },
    )
    discriminator_freeze_after_updates: int | None = field(
        default=None,
        metadata={"help": "Freeze the online discriminator after this many updates (it keeps scoring). None: never."},
    )
    discriminator_collapse_patience: int = field(
        default=20, metadata={"help": "Consecutive degenerate discriminator updates before a collapse warning."}
    )

    # Discriminator model: shared with the policy or separate
    discriminator_type: str | None = field(
        default=None,
        metadata={
            "help": "'shared' (LoRA + score head on the policy's own weights), 'frozen_copy' (on a frozen copy of the "
            "backbone) or 'full_copy' (a separate trainable model). None: 'shared' unless a separate discriminator "
            "is given or the policy is sharded (ZeRO-3/FSDP).",
            "choices": [None, *DISCRIMINATOR_TYPES],
        },
    )
    discriminator_lora_r: int = field(
        default=16, metadata={"help": "LoRA rank of the shared discriminator's adapter (without a peft config)."}
    )
    discriminator_lora_alpha: float = field(
        default=32.0, metadata={"help": "LoRA alpha of the shared discriminator's adapter (without a peft config)."}
    )

    # Fixed reference-conditioned discriminator
    reference_scorer: str | None = field(
        default=None,
        metadata={
            "help": "A fixed reference-conditioned scorer instead of the online discriminator: 'ngram_f1', a dotted "
            "path to a callable (prompts, references, completions) -> scores, or a POLAR-style sequence classifier "
            "(folder or Hub name). None: the online discriminator."
        },
    )
    reference_scorer_template: str | None = field(
        default=None,
        metadata={"help": "Template with {prompt}, {reference} and {completion} for a model reference scorer."},
    )
    reference_scorer_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (dict or JSON string) for the model reference scorer's from_pretrained."},
    )

    # Streams
    demonstration_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of prompts per generation batch taken from demonstrations. None: 0.5 with a separate "
            "demonstration dataset, the natural share when demonstrations are mixed into the train dataset."
        },
    )

    # ---------------------------------------------------------------------------------------------------------------
    # LUFFY: the expert's completion inside its prompt's GRPO group (arXiv 2504.14945). Logic in trl_uniapl/luffy.py.
    # ---------------------------------------------------------------------------------------------------------------
    expert_in_group: bool = field(
        default=False,
        metadata={
            "help": "LUFFY: on each demonstration prompt, the expert's completion replaces the last of its group's "
            "`num_generations` rollouts; it is rewarded and normalised with its group, and its tokens get the "
            "off-policy gradient -A * grad f(pi_theta) (no clipping)."
        },
    )
    expert_shaping_gamma: float | None = field(
        default=0.1,
        metadata={
            "help": "LUFFY: gamma of the policy shaping f(x) = x / (x + gamma) of the expert tokens' ratio pi_theta. "
            "None: no shaping (plain ratio)."
        },
    )

    def __post_init__(self):
        # TrainingArguments parses JSON-string dict fields with a bare JSONDecodeError; name the field instead.
        for name in ("discriminator_init_kwargs", "reference_scorer_init_kwargs"):
            if isinstance(getattr(self, name), str):
                try:
                    json.loads(getattr(self, name))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"`{name}` is not valid JSON ({error}): {getattr(self, name)!r}. "
                        'Example: \'{"dtype": "bfloat16"}\'.'
                    ) from error
        super().__post_init__()

        def check_choice(name: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")

        check_choice("sft_coef_schedule", SFT_COEF_SCHEDULES)
        check_choice("discriminator_loss", DISCRIMINATOR_LOSSES)
        if self.adversarial_reward is None:
            self.adversarial_reward = "score" if self.discriminator_loss == "bt" else "gail"
        check_choice("adversarial_reward", ADVERSARIAL_REWARDS)
        check_choice("adversarial_reward_scope", ADVERSARIAL_REWARD_SCOPES)
        check_choice("adversarial_coef_mode", ADVERSARIAL_COEF_MODES)

        for name in ("sft_coef", "sft_coef_final", "adversarial_coef", "adversarial_coef_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}. Use 0 to disable the term.")
        for name in ("sft_coef_warmup_steps", "discriminator_warmup_steps", "sft_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.sft_warmup_steps >= 1 and self.sft_warmup_steps != int(self.sft_warmup_steps):
            raise ValueError(
                f"`sft_warmup_steps` must be a whole number of steps (>= 1) or a share of the run in (0, 1), got "
                f"{self.sft_warmup_steps}."
            )
        for name in ("discriminator_update_interval", "discriminator_steps", "discriminator_collapse_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.discriminator_learning_rate <= 0:
            raise ValueError(
                f"`discriminator_learning_rate` must be > 0, got {self.discriminator_learning_rate}. To switch the "
                "discriminator off, set `adversarial_coef=0`."
            )
        if self.adversarial_reward_clip is not None and self.adversarial_reward_clip <= 0:
            raise ValueError(
                f"`adversarial_reward_clip` must be > 0 or None (no clipping), got {self.adversarial_reward_clip}."
            )
        if self.discriminator_max_grad_norm is not None and self.discriminator_max_grad_norm <= 0:
            raise ValueError(
                "`discriminator_max_grad_norm` must be > 0 or None (no clipping), got "
                f"{self.discriminator_max_grad_norm}."
            )
        if not 0.0 <= self.discriminator_label_smoothing < 0.5:
            raise ValueError(
                f"`discriminator_label_smoothing` must be in [0, 0.5), got {self.discriminator_label_smoothing}."
            )
        if self.adversarial_coef_mode == "lagrangian":
            if not 0.0 <= self.divergence_target <= LOG_2:
                raise ValueError(
                    f"`divergence_target` must be in [0, log 2 ≈ 0.693] nats, got {self.divergence_target}: the "
                    "Jensen-Shannon divergence never exceeds log 2."
                )
            if self.adversarial_coef_max < self.adversarial_coef:
                raise ValueError(
                    f"`adversarial_coef_max` ({self.adversarial_coef_max}) must be >= the initial `adversarial_coef` "
                    f"({self.adversarial_coef})."
                )
        if self.discriminator_loss == "bt" and self.adversarial_reward in BCE_ONLY_ADVERSARIAL_REWARDS:
            raise ValueError(
                f"`adversarial_reward={self.adversarial_reward!r}` reads the discriminator's logit as log-odds, but "
                "`discriminator_loss='bt'` trains only differences of logits, so their offset is arbitrary. Use "
                "`adversarial_reward='score'` (the logit minus the batch's mean expert logit) with 'bt', or "
                "`discriminator_loss='bce'`."
            )
        if self.discriminator_loss == "bt" and self.adversarial_coef_mode == "lagrangian":
            raise ValueError(
                "`adversarial_coef_mode='lagrangian'` follows the discriminator's Jensen-Shannon estimate, which "
                "needs D's probabilities; `discriminator_loss='bt'` trains only differences of logits. Use "
                "`discriminator_loss='bce'` with 'lagrangian', or `adversarial_coef_mode='fixed'` with 'bt'."
            )
        if self.demonstration_ratio is not None and not 0.0 <= self.demonstration_ratio <= 1.0:
            raise ValueError(
                f"`demonstration_ratio` must be in [0, 1] (the share of prompts per generation batch that come from "
                f"demonstrations), got {self.demonstration_ratio}. Use None for the default."
            )
        if self.discriminator_init_kwargs is not None and not isinstance(self.discriminator_init_kwargs, dict):
            raise ValueError(
                "`discriminator_init_kwargs` must be a dict or a JSON object string, got "
                f"{type(self.discriminator_init_kwargs).__name__}."
            )
        if self.sft_per_device_train_batch_size is not None and self.sft_per_device_train_batch_size < 1:
            raise ValueError(
                f"`sft_per_device_train_batch_size` must be >= 1, got {self.sft_per_device_train_batch_size}. Use "
                "None to read only the demonstrations of the generation batch, or `sft_coef=0` for no SFT term."
            )
        if self.sft_warmup_steps > 0 and self.sft_per_device_train_batch_size is None:
            raise ValueError(
                f"`sft_warmup_steps={self.sft_warmup_steps}` trains on the SFT term's own batch, but "
                "`sft_per_device_train_batch_size=None` reads demonstrations only from generation batches, which the "
                "warm-up does not make. Set `sft_per_device_train_batch_size` (e.g. 16), or `sft_warmup_steps=0` for "
                "no SFT-only warm-up (the default is 0.5, half the run)."
            )
        if self.sft_warmup_learning_rate is not None and self.sft_warmup_learning_rate <= 0:
            raise ValueError(
                f"`sft_warmup_learning_rate` must be > 0 or None (`learning_rate`), got "
                f"{self.sft_warmup_learning_rate}."
            )
        if self.discriminator_freeze_after_updates is not None and self.discriminator_freeze_after_updates < 0:
            raise ValueError(
                "`discriminator_freeze_after_updates` must be >= 0 or None (never frozen), got "
                f"{self.discriminator_freeze_after_updates}."
            )
        if self.demonstration_ratio == 0.0 and self.uses_discriminator:
            if self.discriminator_loss == "bt":
                raise ValueError(
                    "`demonstration_ratio=0` rolls out no demonstration prompt, so the discriminator's real samples "
                    "come from the SFT batch, on other prompts than its fake samples; `discriminator_loss='bt'` "
                    "compares an expert and a policy completion of one prompt. Use `discriminator_loss='bce'`, or "
                    "set `demonstration_ratio` > 0."
                )
            if self.adversarial_reward_scope == "demonstrations":
                raise ValueError(
                    "`adversarial_reward_scope='demonstrations'` rewards only the rollouts of demonstration prompts, "
                    "but `demonstration_ratio=0` rolls out none: the adversarial term would be zero. Use "
                    "`adversarial_reward_scope='all'` or set `demonstration_ratio` > 0."
                )
            if self.sft_per_device_train_batch_size is None:
                raise ValueError(
                    "`demonstration_ratio=0` with a discriminator takes its real samples from the SFT term's own "
                    "batch, but `sft_per_device_train_batch_size=None`. Set it (e.g. 16), or set "
                    "`demonstration_ratio` > 0."
                )
        # Discriminator model
        if self.discriminator_type is not None and self.discriminator_type not in DISCRIMINATOR_TYPES:
            raise ValueError(
                f"`discriminator_type` must be one of {list(DISCRIMINATOR_TYPES)} or None, got "
                f"{self.discriminator_type!r}."
            )
        if self.discriminator_type in ("shared", "frozen_copy") and self.discriminator_model_name_or_path:
            raise ValueError(
                f"`discriminator_type={self.discriminator_type!r}` reads the policy's own weights, but "
                f"`discriminator_model_name_or_path={self.discriminator_model_name_or_path!r}` names a separate "
                "model. Set `discriminator_type='full_copy'` to train that model, or drop the path."
            )
        if self.discriminator_lora_r < 1 or self.discriminator_lora_alpha <= 0:
            raise ValueError(
                f"`discriminator_lora_r` must be >= 1 and `discriminator_lora_alpha` > 0, got "
                f"{self.discriminator_lora_r} and {self.discriminator_lora_alpha}."
            )

        if self.reference_scorer is not None:
            if self.adversarial_coef_mode == "lagrangian":
                raise ValueError(
                    "`adversarial_coef_mode='lagrangian'` follows the online discriminator's Jensen-Shannon estimate; "
                    f"a fixed `reference_scorer` ({self.reference_scorer!r}) has none. Use "
                    "`adversarial_coef_mode='fixed'`."
                )
            if self.demonstration_ratio == 0.0:
                raise ValueError(
                    "`reference_scorer` scores the rollouts of demonstration prompts against their expert completion, "
                    "but `demonstration_ratio=0` rolls out none. Set `demonstration_ratio` > 0 (or None)."
                )
        validate_luffy(self)  # LUFFY (trl_uniapl/luffy.py)

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **uniapl_fields: Any) -> "UniAPLConfig":
        """A `UniAPLConfig` with every field of `args` (a plain `GRPOConfig`, e.g. of a GRPO script whose trainer class
        was swapped) and the UniAPL fields at their defaults, or as given in `uniapl_fields`."""
        values = {config_field.name: getattr(args, config_field.name) for config_field in fields(GRPOConfig)}
        values = {name: value for name, value in values.items() if name in cls.__dataclass_fields__}
        values = {name: value for name, value in values.items() if cls.__dataclass_fields__[name].init}
        values["generation_batch_size"] = None  # GRPOConfig derived it from steps_per_generation; both are refused
        return cls(**values, **uniapl_fields)

    @property
    def uses_discriminator(self) -> bool:
        """Whether the adversarial term can ever be non-zero, hence whether a discriminator is needed."""
        return self.adversarial_coef > 0 or self.adversarial_coef_mode == "lagrangian"

    def get_sft_warmup_steps(self, num_training_steps: int) -> int:
        """Optimizer steps of the SFT-only warm-up in a run of `num_training_steps` (as `get_warmup_steps` reads
        `warmup_steps`): `sft_warmup_steps` itself from 1 up, or that share of the run, rounded up."""
        if self.sft_warmup_steps >= 1:
            return int(self.sft_warmup_steps)
        return math.ceil(num_training_steps * self.sft_warmup_steps)
