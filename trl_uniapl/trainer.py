"""UniAPLTrainer: GRPO with expert demonstrations and an online discriminator, in one training stage."""

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_config_model_id, is_async_callable, nanstd, selective_log_softmax

from .checkpoints import COMPLETE_MARKER, check_checkpoint_files
from .config import UniAPLConfig
from .discriminator import (
    Discriminator,
    DiscriminatorUpdate,
    adversarial_reward,
    discriminator_lora_config,
    ensure_pad_token,
    group_relative_advantages,
    js_estimate,
    load_discriminator_model,
    load_discriminator_tokenizer,
    optimizer_settings,
    policy_quantization_config,
)
from .shared_discriminator import build_shared_discriminator, resolve_discriminator_type
from .streams import MixedRepeatSampler, demonstrations_per_batch, merge_streams, validate_row

logger = logging.getLogger(__name__)

DISCRIMINATOR_DIR = "discriminator"

UNIAPL_PAPER = {
    "title": "UniAPL: A Unified Adversarial Preference Learning Framework for Instruct-Following",
    "id": "2509.25148",
    "citation": """\
@article{qian2025uniapl,
    title        = {{UniAPL: A Unified Adversarial Preference Learning Framework for Instruct-Following}},
    author       = {Qian and others},
    year         = 2025,
    eprint       = {arXiv:2509.25148},
}""",
}


# The private GRPOTrainer hooks this trainer overrides or calls, with the parameters they have in TRL 1.16. TRL changes
# them between minor versions (GRPOTrainer changed by 430 lines from 1.14 to 1.16): fail at import, not mid-run.
TRL_HOOKS = {
    "_generate": ("self", "prompts"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_train_sampler": ("self", "dataset"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
}


def check_trl_compatibility(trainer_class: type = GRPOTrainer) -> None:
    """Raise an ImportError saying which TRL to install when `trainer_class` lacks a hook this trainer relies on."""
    import trl

    problems = []
    for name, expected in TRL_HOOKS.items():
        hook = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(hook).parameters) if hook is not None else None
        if found != expected:
            problems.append(f"GRPOTrainer.{name}{'(' + ', '.join(found) + ')' if found else ' is missing'}")
    if not getattr(trainer_class, "loss_is_scaled_for_ga", False):
        problems.append("GRPOTrainer.loss_is_scaled_for_ga is not True")
    if problems:
        raise ImportError(
            f"trl-uniapl supports trl 1.16.x, but the installed trl {trl.__version__} differs where UniAPLTrainer "
            f"extends GRPOTrainer: {'; '.join(problems)}. Install a supported version: pip install 'trl>=1.16,<1.17'."
        )


check_trl_compatibility()


def _named_reward_func(reward_func, name: str):
    """Wrap a synchronous reward function so that an exception it raises says which function and rows made it fail.
    The exception keeps its type (the context is added as a note); the function is called exactly as TRL calls it."""

    @functools.wraps(reward_func)
    def wrapped(*args, **kwargs):
        try:
            return reward_func(*args, **kwargs)
        except Exception as error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                prompts = kwargs.get("prompts", args[0] if args else [])
                preview = [str(p)[:60] for p in list(prompts)[:3]]
                error.add_note(
                    f"Raised by reward function {name!r} while scoring a batch of {len(prompts)} completions (first "
                    f"prompts: {preview}). Fix the reward function, or return None for rows it cannot score."
                )
            raise

    return wrapped


@dataclasses.dataclass
class GenerationBatch:
    """What the hooks of one generation batch hand to each other, for this process's rows.

    Filled in order: `_generate_and_score_completions` (which rows are demonstrations, their expert completions), then
    `_generate` (the prompts' token ids exactly as the policy saw them), then `_calculate_rewards` (the prompts and
    completions the reward functions saw), then the adversarial rewards.
    """

    is_demonstration: list[bool] = dataclasses.field(default_factory=list)
    expert_completions: list[Any] = dataclasses.field(default_factory=list)
    expert_ids: list[list[int] | None] = dataclasses.field(default_factory=list)
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)
    prompts: list[Any] = dataclasses.field(default_factory=list)
    completions: list[Any] = dataclasses.field(default_factory=list)
    completion_ids: list[list[int]] = dataclasses.field(default_factory=list)
    adversarial_rewards: torch.Tensor | None = None  # NaN where a row is not scored
    adversarial_advantages: torch.Tensor | None = None


class UniAPLTrainer(GRPOTrainer):
    """
    Trainer for UniAPL (Unified Adversarial Preference Learning, arXiv 2509.25148): one training stage on mixed
    batches of expert demonstrations and preference prompts.

        L(θ) = L_GRPO(θ; A_task + λ·A_adv) + α(t)·NLL(expert completions)

    The objective is a reconstruction from the paper's abstract (see the README): the GRPO term is TRL's, untouched,
    and A_task is the advantage TRL computes from the task rewards alone. A_adv comes from a discriminator trained
    online to tell the expert's completions from the policy's (GAIL; GAD arXiv 2511.10643): its reward r_adv is
    centred within each group of completions and divided by its standard deviation over the batch,

        A_adv(i) = (r_adv(i) − mean_{group(i)} r_adv) / (std_batch(r_adv − group mean) + 1e-4),

    so that λ is its weight relative to a unit-scale task advantage (summing the rewards before GRPO's group
    normalisation would let the discriminator alone set the advantages of every group whose task reward is constant,
    whatever λ). λ can follow dual ascent on the discriminator's Jensen–Shannon estimate (the paper's constrained
    formulation). The SFT term is CHORD-style (arXiv 2508.11408): the token-mean NLL of the demonstrations that each
    optimizer step carries.

    The only changes with respect to [`~trl.GRPOTrainer`] are:

    - the constructor also takes `demonstration_dataset`, `discriminator`, `discriminator_peft_config` and
      `discriminator_processing_class`, merges the demonstrations into the training data and builds the discriminator;
    - `_get_train_sampler` puts demonstration and preference prompts into every generation batch;
    - `_generate` and `_calculate_rewards` record the prompt token ids and completions of the batch (unchanged);
    - `_generate_and_score_completions` adds λ·A_adv to the advantages (training the discriminator when an update is
      due) and prepares each micro-step's share of the expert completions for the SFT term;
    - `compute_loss` adds α(t)·NLL of the expert completions to `super().compute_loss(...)`;
    - `save_model`, `_save_checkpoint` and `_load_optimizer_and_scheduler` also save and restore the discriminator,
      its optimizer and λ; `train(resume_from_checkpoint=True)` skips a checkpoint whose writing was interrupted.

    With no demonstrations (and `sft_coef=0`, `adversarial_coef=0`, or a plain `GRPOConfig`), training is exactly
    GRPOTrainer's. With a plain `GRPOConfig`, demonstrations come only from `demonstration_dataset`: a `completion`
    column of `train_dataset` stays what it is for GRPO (e.g. reference answers for a reward function).

    Args:
        model, reward_funcs, args, train_dataset, **kwargs:
            As in [`~trl.GRPOTrainer`]; every other GRPOTrainer argument (`eval_dataset`, `processing_class`,
            `peft_config`, `quantization_config`, `environment_factory`, ...) is passed through by keyword. `args`
            may be a [`UniAPLConfig`] or a plain `GRPOConfig` (converted with [`UniAPLConfig.from_grpo_config`]). With
            a `UniAPLConfig`, rows of `train_dataset` with a non-empty `completion` are demonstrations.
        demonstration_dataset ([`~datasets.Dataset`], *optional*):
            Demonstrations in prompt-completion format (standard or conversational, like `train_dataset`).
        discriminator ([`~transformers.PreTrainedModel`], *optional*):
            A sequence classifier with one label to use as the discriminator, instead of loading
            `args.discriminator_model_name_or_path`. Unless it is a copy of the policy's checkpoint (same name and
            vocabulary), pass its tokenizer as `discriminator_processing_class`.
        discriminator_peft_config ([`~peft.PeftConfig`], *optional*):
            LoRA for the discriminator. Defaults to the policy's `peft_config` (retargeted to sequence classification)
            when the policy uses LoRA.
        discriminator_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The discriminator's tokenizer. Defaults to the policy's when the discriminator is the policy's checkpoint
            (it then reads the policy's token ids), else to the tokenizer stored with the discriminator.
    """

    _tag_names = ["trl", "grpo", "uniapl"]
    _name = "UniAPL"
    _paper = UNIAPL_PAPER

    def __init__(
        self,
        model: "str | PreTrainedModel",
        reward_funcs=None,
        args: UniAPLConfig | GRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        *,
        demonstration_dataset: Dataset | None = None,
        discriminator: PreTrainedModel | None = None,
        discriminator_peft_config=None,
        discriminator_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ):
        # A plain GRPOConfig is a GRPO script with the class swapped: its `completion` column (e.g. reference answers
        # for a reward function) is not a demonstration, so that the swap alone never changes training.
        demonstrations_in_train_dataset = args is None or isinstance(args, UniAPLConfig)
        streams = merge_streams(
            train_dataset,
            demonstration_dataset,
            demonstrations_in_train_dataset=demonstrations_in_train_dataset,
            require_prompts=kwargs.get("environment_factory") is None,
        )
        # Without demonstrations, a config that is not a UniAPLConfig gives exactly GRPO: no UniAPL term.
        grpo_only = {} if streams.has_demonstrations else {"sft_coef": 0.0, "adversarial_coef": 0.0}
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = UniAPLConfig(f"{model_name.split('/')[-1]}-UniAPL", **grpo_only)
        elif not isinstance(args, UniAPLConfig):
            args = UniAPLConfig.from_grpo_config(args, **grpo_only)
        self._check_streams_against_config(args, streams)
        self._streams = streams

        # Every other GRPOTrainer argument (eval_dataset, processing_class, peft_config, ...) goes to the parent as is.
        super().__init__(model, reward_funcs, args=args, train_dataset=streams.dataset, **kwargs)

        self._has_demonstrations = streams.has_demonstrations
        self._demonstrations_in_train_dataset = demonstrations_in_train_dataset
        self._batch = GenerationBatch()
        # Per mode: an evaluation between two optimizer steps of one generation batch must not replace its training
        # micro-batches, which TRL keeps buffered (the policy's rows are buffered the same way).
        self._sft_micro_batches: dict[str, list[dict[str, torch.Tensor]]] = {"train": [], "eval": []}
        self.discriminator: Discriminator | None = None
        self.adversarial_coef = args.adversarial_coef  # λ; moves in "lagrangian" mode
        self._discriminator_state = {
            "last_update_step": None,
            "num_updates": 0,
            "skipped_updates": 0,
            "generation_batches": 0,
        }
        self._collapse_streak = 0
        for i, reward_func in enumerate(self.reward_funcs):
            if not isinstance(reward_func, nn.Module) and not is_async_callable(reward_func):
                self.reward_funcs[i] = _named_reward_func(reward_func, self.reward_func_names[i])
        if not self._has_demonstrations:
            return
        prompts_per_batch = self.args.generation_batch_size // self.num_generations
        self._demonstrations_per_batch = demonstrations_per_batch(streams, prompts_per_batch, args.demonstration_ratio)
        logger.info(
            "UniAPL: %d of the %d prompts of each generation batch are demonstrations.",
            self._demonstrations_per_batch,
            prompts_per_batch,
        )
        if args.uses_discriminator:
            self.discriminator = self._build_discriminator(
                model,
                discriminator,
                discriminator_peft_config,
                discriminator_processing_class,
                kwargs.get("peft_config"),
                kwargs.get("quantization_config"),
            )

    @staticmethod
    def _check_streams_against_config(args: UniAPLConfig, streams) -> None:
        if streams.has_demonstrations:
            if args.demonstration_ratio == 0.0:
                raise ValueError(
                    f"`demonstration_ratio=0` but {len(streams.demonstration_indices)} demonstrations were given: "
                    "they would never be used. Set `demonstration_ratio` > 0 (or None for the default), or drop the "
                    "demonstrations."
                )
            steps_per_generation, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
            if args.sft_coef > 0 and steps_per_generation % accumulation != 0:
                raise ValueError(
                    f"`steps_per_generation={steps_per_generation}` is not a multiple of "
                    f"`gradient_accumulation_steps={accumulation}`: an optimizer step would span several generation "
                    "batches, so the SFT term could not be normalised by the exact token count of each step's "
                    "demonstrations. Leave `steps_per_generation` unset (it defaults to "
                    "`gradient_accumulation_steps`) or set it to a multiple of it."
                )
            return
        if args.demonstration_ratio is not None and args.demonstration_ratio > 0:
            raise ValueError(
                f"`demonstration_ratio={args.demonstration_ratio}` but no demonstrations were given. Pass "
                "`demonstration_dataset=` (prompt + completion rows), add rows with a `completion` to "
                "`train_dataset`, or leave `demonstration_ratio=None`."
            )
        if args.uses_discriminator:
            raise ValueError(
                f"`adversarial_coef={args.adversarial_coef}` (mode {args.adversarial_coef_mode!r}) needs expert "
                "demonstrations for the discriminator, but none were given. Pass `demonstration_dataset=`, add rows "
                "with a `completion` to `train_dataset`, or set `adversarial_coef=0` (and "
                "`adversarial_coef_mode='fixed'`)."
            )

    def _build_discriminator(
        self, policy, discriminator, discriminator_peft_config, processing_class, peft_config, quantization_config
    ) -> Discriminator:
        args = self.args
        unwrapped_policy = self.accelerator.unwrap_model(self.model)
        policy_id = policy if isinstance(policy, str) else get_config_model_id(unwrapped_policy.config)
        kind = resolve_discriminator_type(
            args.discriminator_type,
            discriminator is not None,
            bool(args.discriminator_model_name_or_path),
            processing_class is not None,
            self.is_fsdp_enabled or self._is_zero3(),
        )
        if kind != "full_copy":  # LoRA + score head on the policy's own weights (or a frozen copy of them)
            return build_shared_discriminator(
                unwrapped_policy,
                kind,
                self._tokenizer,
                args,
                discriminator_peft_config or peft_config,
                policy_id,
                self.accelerator.device,
            )
        path = args.discriminator_model_name_or_path or policy_id
        # Loading initialises the score head: do it on a forked RNG so the policy's random stream is unchanged.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            if discriminator is None:
                discriminator = load_discriminator_model(
                    path,
                    args.discriminator_init_kwargs,
                    policy_quantization_config(unwrapped_policy, quantization_config),
                )
            elif processing_class is None:
                self._check_discriminator_reads_policy_tokens(discriminator, policy_id)
            if discriminator_peft_config is None and peft_config is not None:
                discriminator_peft_config = discriminator_lora_config(peft_config)
            if discriminator_peft_config is not None:
                from peft import get_peft_model

                discriminator = get_peft_model(discriminator, discriminator_peft_config)
        if processing_class is None:
            same_checkpoint = args.discriminator_model_name_or_path is None or path == policy_id
            processing_class = self._tokenizer if same_checkpoint else load_discriminator_tokenizer(path)
        uses_policy_tokens = processing_class is self._tokenizer
        ensure_pad_token(processing_class, discriminator)
        if not getattr(discriminator, "is_loaded_in_4bit", False) and not getattr(
            discriminator, "is_loaded_in_8bit", False
        ):
            discriminator.to(self.accelerator.device)
        return Discriminator(
            discriminator, processing_class, uses_policy_tokens=uses_policy_tokens, **optimizer_settings(args)
        )

    def _check_discriminator_reads_policy_tokens(self, discriminator: PreTrainedModel, policy_id: str) -> None:
        """A `discriminator=` instance without its own tokenizer reads the policy's token ids: only sound when it is
        the policy's checkpoint (same name and vocabulary), else it silently reads other tokens' embeddings."""
        discriminator_id = getattr(discriminator.config, "_name_or_path", "") or "<unnamed>"
        discriminator_vocab = discriminator.get_input_embeddings().num_embeddings
        policy_vocab = len(self._tokenizer)
        if discriminator_id != policy_id or discriminator_vocab < policy_vocab:
            raise ValueError(
                f"The `discriminator` passed ({discriminator_id}, {discriminator_vocab} token embeddings) is not the "
                f"policy's checkpoint ({policy_id}, a tokenizer of {policy_vocab} tokens), so it cannot read the "
                "policy's token ids. Pass its tokenizer as `discriminator_processing_class=` (completions are then "
                "re-tokenized for it), or build the discriminator from the policy's checkpoint."
            )

    def _is_zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _get_train_sampler(self, dataset=None):
        if not self._has_demonstrations:
            return super()._get_train_sampler(dataset)
        return MixedRepeatSampler(
            preference_indices=self._streams.preference_indices,
            demonstration_indices=self._streams.demonstration_indices,
            num_demonstrations=self._demonstrations_per_batch,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _generate(self, prompts: list):
        """Records the prompts' token ids exactly as the policy saw them: the SFT term and the discriminator append the
        expert's and the policy's completions to them."""
        output = super()._generate(prompts)
        self._batch.prompt_ids = [list(ids) for ids in output[0]]
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """Records the completions (and the prompts as the reward functions see them) for the discriminator."""
        self._batch.prompts, self._batch.completions = prompts, completions
        self._batch.completion_ids = [list(ids) for ids in completion_ids_list]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        """GRPO's batch, with λ·A_adv added to its advantages and each micro-step's demonstrations prepared for the SFT
        term."""
        if not self._has_demonstrations:
            if self._demonstrations_in_train_dataset and any(row.get("completion") is not None for row in inputs):
                raise ValueError(
                    "A training row has a `completion` (a demonstration), but the trainer was built without "
                    "demonstrations (e.g. from an IterableDataset). Pass the demonstrations as a map-style "
                    "`demonstration_dataset` or `train_dataset`."
                )
            return super()._generate_and_score_completions(inputs)

        mode = "train" if self.model.training else "eval"
        is_demonstration = [row.get("completion") is not None for row in inputs]
        for index, row in enumerate(inputs):
            if is_demonstration[index]:
                validate_row(row, f"{mode} batch", index, demonstration=True)
        self._batch = GenerationBatch(
            is_demonstration=is_demonstration,
            expert_completions=[row.get("completion") for row in inputs],
            expert_ids=self._tokenize_expert_completions(inputs, is_demonstration, mode),
        )
        applied_coef = self._effective_adversarial_coef()  # before the dual step of this batch's update

        output = super()._generate_and_score_completions(inputs)

        if self.discriminator is not None:
            adversarial_advantages = self._adversarial_advantages(mode)
            if applied_coef != 0.0:
                output["advantages"] = output["advantages"] + applied_coef * adversarial_advantages
            self._metrics[mode]["adversarial/coef"].append(applied_coef)
        if self.args.sft_coef > 0:
            self._sft_micro_batches[mode] = self._build_sft_micro_batches(mode)
        return output

    def _is_carrier(self, row: int, num_rows: int, mode: str) -> bool:
        """Whether this process's `row` (of `num_rows`) is the first of its group of `num_generations` copies of one
        prompt over all processes: a demonstration counts once per generation batch, through its carrier row."""
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        return (self.accelerator.process_index * num_rows + row) % num_generations == 0

    def _tokenize_expert_completions(
        self, inputs: list[dict[str, Any]], is_demonstration: list[bool], mode: str
    ) -> list[list[int] | None]:
        """Expert completion token ids, rendered as the policy would produce them (ending with eos)."""
        tokenizer = self._tokenizer
        eos_token_id = tokenizer.eos_token_id
        expert_ids, lengths, truncated = [], [], 0
        for index, (row, is_demo) in enumerate(zip(inputs, is_demonstration, strict=True)):
            if not is_demo:
                expert_ids.append(None)
                continue
            if is_conversational(row):
                rendered = apply_chat_template(
                    {"prompt": row["prompt"], "completion": row["completion"]},
                    tokenizer,
                    tools=self.tools or None,
                    **self.chat_template_kwargs,
                )
                ids = tokenizer(rendered["completion"], add_special_tokens=False)["input_ids"]
                # The template may close the turn with text after eos (e.g. "\n"), which the policy never generates.
                eos_positions = [i for i, token in enumerate(ids) if token in self.eos_token_ids]
                ids = ids[: eos_positions[-1] + 1] if eos_positions else ids + [eos_token_id]
            else:
                ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos_token_id]
            # Lengths and truncation are counted once per demonstration, not once per generation.
            is_carrier = self._is_carrier(index, len(inputs), mode)
            if is_carrier:
                lengths.append(min(len(ids), self.max_completion_length))
            if len(ids) > self.max_completion_length:
                ids = ids[: self.max_completion_length]
                truncated += int(is_carrier)
            expert_ids.append(ids)
        stats = torch.tensor(
            [float(sum(lengths)), float(len(lengths)), float(truncated)], device=self.accelerator.device
        )
        total_length, count, total_truncated = self.accelerator.gather(stats).view(-1, 3).sum(0).tolist()
        if count > 0:
            self._metrics[mode]["expert/mean_length"].append(total_length / count)
            self._metrics[mode]["expert/truncated_ratio"].append(total_truncated / count)
        if total_truncated and self.accelerator.is_main_process:
            logger.warning(
                "%d of the %d demonstrations in this batch are longer than max_completion_length=%d tokens and were "
                "truncated for the SFT term and the discriminator.",
                int(total_truncated),
                int(count),
                self.max_completion_length,
            )
        return expert_ids

    def _build_sft_micro_batches(self, mode: str) -> list[dict[str, torch.Tensor]]:
        """
        This process's demonstrations for each micro-step of the generation batch, with the exact normaliser of the
        SFT term.

        TRL splits a generation batch into `steps_per_generation` micro-steps, `gradient_accumulation_steps` of which
        make one optimizer step. Each demonstration (its carrier row) goes to one optimizer step, round robin, so
        every step carries its share; when this process has fewer demonstrations than steps, they are reused so that
        no step goes without. A step's normaliser is the number of expert tokens it carries over all processes, so
        that its SFT gradient is exactly α·∇ token-mean NLL of its demonstrations. In evaluation, one micro-step.
        """
        batch = self._batch
        carriers = [
            row
            for row, ids in enumerate(batch.expert_ids)
            if ids is not None and self._is_carrier(row, len(batch.expert_ids), mode)
        ]
        micro_steps = self.args.steps_per_generation if mode == "train" else 1
        window = self.args.gradient_accumulation_steps if mode == "train" else 1
        num_steps = micro_steps // window
        rows_per_micro_step: list[list[int]] = [[] for _ in range(micro_steps)]
        for position, row in enumerate(carriers):
            step = position % num_steps
            rows_per_micro_step[step * window + (position // num_steps) % window].append(row)
        for step in range(len(carriers), num_steps if carriers else 0):
            rows_per_micro_step[step * window].append(carriers[step % len(carriers)])

        micro_batches = [self._expert_tensors(rows) for rows in rows_per_micro_step]
        local_tokens = torch.tensor(
            [float((micro_batch["labels"] != -100).sum()) for micro_batch in micro_batches],
            device=self.accelerator.device,
        )
        tokens = self.accelerator.gather(local_tokens.reshape(1, -1)).sum(0)
        tokens_per_step = tokens.view(num_steps, window).sum(1).repeat_interleave(window)
        for micro_batch, step_tokens in zip(micro_batches, tokens_per_step, strict=True):
            # DDP averages gradients over processes, hence the division by their number.
            micro_batch["normalizer"] = step_tokens.clamp(min=1.0) / self.accelerator.num_processes
        return micro_batches

    def _expert_tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded prompt + expert completion of the given rows, labels on the completion tokens only."""
        batch = self._batch
        sequences = [batch.prompt_ids[row] + batch.expert_ids[row] for row in rows]
        width = max([len(sequence) for sequence in sequences], default=1)
        input_ids = torch.full((len(rows), width), self._tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for position, (row, sequence) in enumerate(zip(rows, sequences, strict=True)):
            input_ids[position, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[position, : len(sequence)] = 1
            labels[position, len(batch.prompt_ids[row]) : len(sequence)] = torch.tensor(batch.expert_ids[row])
        device = self.accelerator.device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "labels": labels.to(device),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self._has_demonstrations or self.args.sft_coef == 0:
            return loss
        sft_coef = self.sft_coef_at(self.state.global_step)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sft/coef"].append(sft_coef)
        if sft_coef == 0:  # the same on every process, so ZeRO-3/FSDP still see the same forward passes
            return loss
        micro_step = self._step % self.args.steps_per_generation if mode == "train" else 0
        return loss + sft_coef * self._sft_loss(model, self._sft_micro_batches[mode][micro_step], mode)

    def sft_coef_at(self, step: int) -> float:
        """α(t): linear warm-up to `sft_coef`, then constant, linear or cosine decay to `sft_coef_final`."""
        args = self.args
        if args.sft_coef_warmup_steps > 0 and step < args.sft_coef_warmup_steps:
            return args.sft_coef * (step + 1) / args.sft_coef_warmup_steps
        if args.sft_coef_schedule == "constant":
            return args.sft_coef
        decay_steps = max(1, self.state.max_steps - args.sft_coef_warmup_steps)
        progress = min(1.0, max(0.0, (step - args.sft_coef_warmup_steps) / decay_steps))
        if args.sft_coef_schedule == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return args.sft_coef_final + (args.sft_coef - args.sft_coef_final) * factor

    def _sft_loss(self, model, micro_batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
        """Summed NLL of this micro-step's expert completion tokens, divided by its optimizer step's token count.

        Runs on every process at every micro-step, with a one-token dummy row when the micro-step holds no
        demonstration, so DeepSpeed ZeRO-3 and FSDP see the same forward passes on every process."""
        input_ids, attention_mask, labels = (
            micro_batch["input_ids"],
            micro_batch["attention_mask"],
            micro_batch["labels"],
        )
        if input_ids.shape[0] == 0:
            input_ids = torch.full((1, 1), self._tokenizer.pad_token_id, dtype=torch.long, device=labels.device)
            attention_mask, labels = torch.ones_like(input_ids), torch.full_like(input_ids, -100)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float() / self.temperature if self.temperature != 1.0 else logits[:, :-1].float()
        targets = labels[:, 1:]
        token_mask = targets != -100
        token_logps = selective_log_softmax(logits, targets.clamp(min=0))
        nll_sum = -(token_logps * token_mask).sum()
        stats = torch.stack([nll_sum.detach(), token_mask.sum().float()])
        total_nll, total_tokens = self.accelerator.gather(stats.reshape(1, 2)).sum(0).tolist()
        if total_tokens > 0:
            self._metrics[mode]["sft/loss"].append(total_nll / total_tokens)
            self._metrics[mode]["expert/logp"].append(-total_nll / total_tokens)
        return nll_sum / micro_batch["normalizer"]

    def _effective_adversarial_coef(self) -> float:
        """λ, held at 0 while the discriminator warms up."""
        if self.state.global_step < self.args.discriminator_warmup_steps:
            return 0.0
        return self.adversarial_coef

    def _discriminator_inputs(self, rows: list[int], completions: list[Any], completion_ids: list[list[int] | None]):
        """Discriminator batches for the given rows' prompts followed by `completions[row]` (policy's or expert's):
        the policy's token ids when it shares the policy's tokenizer, else the re-rendered text."""
        batch, discriminator = self._batch, self.discriminator
        if discriminator.uses_policy_tokens:
            return discriminator.encode_ids([batch.prompt_ids[row] + completion_ids[row] for row in rows])
        return discriminator.encode_texts([batch.prompts[row] for row in rows], [completions[row] for row in rows])

    @contextlib.contextmanager
    def _discriminator_rng(self):
        """The discriminator's own random stream (dropout), so its passes leave the policy's sampling untouched."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + self._discriminator_state["generation_batches"])
            yield

    def _adversarial_advantages(self, mode: str) -> torch.Tensor:
        """
        A_adv for this process's rows: trains the discriminator when an update is due, scores the completions in scope
        (r_adv, see `adversarial_reward`), then centres them per group and scales them over the whole batch (all
        processes) with [`group_relative_advantages`]. Rows out of scope or with a non-finite score are unscored (0).
        """
        args, discriminator, batch = self.args, self.discriminator, self._batch
        device = self.accelerator.device
        num_rows = len(batch.is_demonstration)
        demo_rows = [row for row, is_demo in enumerate(batch.is_demonstration) if is_demo]
        scope_rows = demo_rows if args.adversarial_reward_scope == "demonstrations" else list(range(num_rows))

        # Real inputs: each distinct expert completion once; `real_index` maps every demo row to its real row.
        real_keys, real_rows, real_index = {}, [], []
        for row in demo_rows:
            key = (tuple(batch.prompt_ids[row]), tuple(batch.expert_ids[row]))
            if key not in real_keys:
                real_keys[key] = len(real_rows)
                real_rows.append(row)
            real_index.append(real_keys[key])
        real_index = torch.tensor(real_index, dtype=torch.long, device=device)
        real_batches = self._discriminator_inputs(real_rows, batch.expert_completions, batch.expert_ids)
        fake_batches = self._discriminator_inputs(demo_rows, batch.completions, batch.completion_ids)

        update = None
        with self._discriminator_rng():
            if mode == "train":
                self._discriminator_state["generation_batches"] += 1
                if (self._discriminator_state["generation_batches"] - 1) % args.discriminator_update_interval == 0:
                    update = self._update_discriminator(real_batches, fake_batches, real_index)
            if update is not None and args.discriminator_score_in_update_pass:
                # The update's forward pass already scored the expert completions and the policy's completions of the
                # demonstration prompts (before its optimizer step, as most GAIL implementations score); only the
                # preference rows in scope need a pass of their own. A group is either a demonstration prompt or not,
                # so the two iterates never meet inside one group, where A_adv compares scores.
                real_logits, fake_logits = update.real_logits, update.fake_logits
                demo_set = set(demo_rows)
                other_rows = [row for row in scope_rows if row not in demo_set]
                other_logits = discriminator.score(
                    self._discriminator_inputs(other_rows, batch.completions, batch.completion_ids)
                )
                logits_by_row = dict(zip(demo_rows, fake_logits)) | dict(zip(other_rows, other_logits))
                policy_logits = torch.stack([logits_by_row[row] for row in scope_rows]) if scope_rows else other_logits
            else:
                # Score after the update: the policy is rewarded by the discriminator it is now facing.
                policy_logits = discriminator.score(
                    self._discriminator_inputs(scope_rows, batch.completions, batch.completion_ids)
                )
                real_logits = discriminator.score(real_batches)[real_index] if demo_rows else policy_logits[:0]
                position = {row: index for index, row in enumerate(scope_rows)}
                fake_logits = policy_logits[[position[row] for row in demo_rows]] if demo_rows else policy_logits[:0]
        expert_score = self._log_discriminator_metrics(real_logits, fake_logits, mode, updated=update is not None)

        # Without expert completions in the batch (an evaluation batch of preference prompts only), "score" has no
        # reference; its offset cancels in the group centring anyway, and only matters for clipping.
        expert_score = 0.0 if expert_score is None else expert_score
        scores = adversarial_reward(policy_logits, args.adversarial_reward, args.adversarial_reward_clip, expert_score)
        in_scope = torch.zeros(num_rows, dtype=torch.bool, device=device)
        in_scope[scope_rows] = True
        rewards = torch.full((num_rows,), float("nan"), device=device)
        rewards[scope_rows] = scores.to(device)
        nonfinite = in_scope & ~torch.isfinite(rewards)
        rewards[nonfinite] = float("nan")
        all_rewards = self.accelerator.gather(rewards)
        num_unscored = int(self.accelerator.gather(nonfinite.sum().reshape(1)).sum().item())
        if num_unscored and self.accelerator.is_main_process:
            logger.warning(
                "The discriminator returned %d non-finite scores; those completions get no adversarial advantage.",
                num_unscored,
            )
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        all_advantages = group_relative_advantages(all_rewards, num_generations)
        self._metrics[mode]["adversarial/unscored"].append(float(num_unscored))
        reward_mean = torch.nanmean(all_rewards).nan_to_num().item()
        self._metrics[mode]["rewards/adversarial/mean"].append(reward_mean)
        self._metrics[mode]["adversarial/reward_mean"].append(reward_mean)
        self._metrics[mode]["rewards/adversarial/std"].append(nanstd(all_rewards).nan_to_num().item())
        process_slice = slice(
            self.accelerator.process_index * num_rows, (self.accelerator.process_index + 1) * num_rows
        )
        batch.adversarial_rewards = rewards
        batch.adversarial_advantages = all_advantages[process_slice]
        return batch.adversarial_advantages

    def _update_discriminator(self, real_batches, fake_batches, real_index: torch.Tensor) -> DiscriminatorUpdate:
        """`discriminator_steps` optimizer steps of the discriminator on this batch; returns the last one."""
        args, mode = self.args, "train"
        losses = []
        for _ in range(args.discriminator_steps):
            update = self.discriminator.update(
                real_batches, fake_batches, args.discriminator_loss, args.discriminator_label_smoothing, real_index
            )
            losses.append(update.loss)
            if not update.applied:
                self._discriminator_state["skipped_updates"] += 1
                logger.warning(
                    "Discriminator update skipped at step %d: non-finite loss or gradient (loss=%s). The "
                    "discriminator keeps its previous weights.",
                    self.state.global_step,
                    update.loss,
                )
        self._discriminator_state["last_update_step"] = self.state.global_step
        self._discriminator_state["num_updates"] += 1
        finite = [loss for loss in losses if math.isfinite(loss)]
        self._metrics[mode]["discriminator/loss"].append(sum(finite) / len(finite) if finite else float("nan"))
        self._metrics[mode]["discriminator/skipped_updates"].append(
            float(self._discriminator_state["skipped_updates"])
        )
        return update

    def _log_discriminator_metrics(
        self, real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str, updated: bool
    ) -> float | None:
        """
        Log what the discriminator's logits mean, over all processes, and return the mean expert logit.

        `bce` (D = σ(s) is a probability): `discriminator/acc_real` (share of expert completions with D > ½),
        `discriminator/acc_fake` (share of policy completions with D < ½) and `discriminator/js_estimate`. `bt` (only
        s_E − s_π is trained): `discriminator/pairwise_acc` (share of pairs with s_E > s_π of the same prompt) and
        `discriminator/score_gap` (mean s_E − s_π). After a training update, this also runs the collapse detector and,
        in `"lagrangian"` mode, the dual step.
        """
        pairs = torch.isfinite(real_logits) & torch.isfinite(fake_logits)
        real, fake = real_logits[pairs].float(), fake_logits[pairs].float()
        stats = torch.tensor(
            [
                float(real.numel()),
                real.sum().item(),
                (real > 0).sum().item(),
                (fake < 0).sum().item(),
                F.logsigmoid(real).sum().item(),
                F.logsigmoid(-fake).sum().item(),
                (real > fake).sum().item(),
                (real - fake).sum().item(),
            ],
            device=self.accelerator.device,
        )
        count, real_sum, real_correct, fake_correct, real_log_d, fake_log_1md, pair_correct, gap_sum = (
            self.accelerator.gather(stats).view(-1, 8).sum(0).tolist()
        )
        if count == 0:
            return None
        if self.args.discriminator_loss == "bce":
            acc_real, acc_fake = real_correct / count, fake_correct / count
            divergence = js_estimate(real_log_d, fake_log_1md, count, count)
            self._metrics[mode]["discriminator/acc_real"].append(acc_real)
            self._metrics[mode]["discriminator/acc_fake"].append(acc_fake)
            self._metrics[mode]["discriminator/js_estimate"].append(divergence)
            accuracy = (acc_real + acc_fake) / 2
        else:
            divergence = None
            accuracy = pair_correct / count
            self._metrics[mode]["discriminator/pairwise_acc"].append(accuracy)
            self._metrics[mode]["discriminator/score_gap"].append(gap_sum / count)
        if mode == "train" and updated:
            self._after_discriminator_update(accuracy, divergence)
        return real_sum / count

    def _after_discriminator_update(self, accuracy: float, divergence: float | None) -> None:
        """Once per discriminator update: count degenerate updates (collapse) and take the dual step on λ."""
        args = self.args
        degenerate = accuracy >= 0.99 or abs(accuracy - 0.5) <= 0.02
        self._collapse_streak = self._collapse_streak + 1 if degenerate else 0
        collapsed = self._collapse_streak >= args.discriminator_collapse_patience
        self._metrics["train"]["discriminator/collapsed"].append(float(collapsed))
        if collapsed and self._collapse_streak % args.discriminator_collapse_patience == 0:
            logger.warning(
                "Discriminator collapse: %s accuracy %.3f for %d consecutive updates (%s). Consider a lower "
                "`discriminator_learning_rate`, label smoothing, or more `discriminator_steps`.",
                "balanced" if args.discriminator_loss == "bce" else "pairwise",
                accuracy,
                self._collapse_streak,
                "it wins outright" if accuracy >= 0.99 else "it cannot tell expert from policy",
            )
        if args.adversarial_coef_mode == "lagrangian" and self.state.global_step >= args.discriminator_warmup_steps:
            updated = self.adversarial_coef + args.adversarial_coef_lr * (divergence - args.divergence_target)
            self.adversarial_coef = min(max(updated, 0.0), args.adversarial_coef_max)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.discriminator is not None and self.args.should_save:
            self.discriminator.save_pretrained(os.path.join(output_dir or self.args.output_dir, DISCRIMINATOR_DIR))

    def _uniapl_state(self) -> dict[str, Any]:
        return {
            "adversarial_coef": self.adversarial_coef,
            "collapse_streak": self._collapse_streak,
            **self._discriminator_state,
        }

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
        if self.args.should_save and os.path.exists(marker):
            os.remove(marker)  # overwriting an older checkpoint of the same step: incomplete until rewritten
        # The parent deletes older checkpoints (save_total_limit) before returning: rotate only once this one is
        # complete, so that an interruption while writing it never leaves the run without a complete checkpoint.
        # Likewise the parent pushes the checkpoint to the Hub before returning: push only once it is complete.
        save_total_limit, push_to_hub = self.args.save_total_limit, self.args.push_to_hub
        self.args.save_total_limit, self.args.push_to_hub = None, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self.args.push_to_hub = save_total_limit, push_to_hub
        if self.args.should_save:
            if self.discriminator is not None:
                self.discriminator.save_training_state(
                    os.path.join(checkpoint_dir, DISCRIMINATOR_DIR), self._uniapl_state()
                )
            # Written last: a checkpoint without it was interrupted while being written.
            with open(marker, "w") as f:
                json.dump({"global_step": self.state.global_step}, f)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if push_to_hub:
            self._push_from_checkpoint(checkpoint_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.discriminator is None:
            return
        state_dir = os.path.join(checkpoint, DISCRIMINATOR_DIR)
        if not os.path.exists(os.path.join(state_dir, "discriminator_state.json")):
            raise ValueError(
                f"The checkpoint {checkpoint} has no discriminator state ({state_dir}): it was written by a run "
                "without a discriminator or its writing was interrupted. Resume from an earlier checkpoint."
            )
        state = self.discriminator.load_training_state(state_dir)
        self.adversarial_coef = state["adversarial_coef"]
        self._collapse_streak = state["collapse_streak"]
        self._discriminator_state = {key: state[key] for key in self._discriminator_state}

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # "true"/"false" as strings come from command lines and YAML files, where Trainer would look for a folder.
        if isinstance(resume_from_checkpoint, str) and not os.path.isdir(resume_from_checkpoint):
            if resume_from_checkpoint.strip().lower() in ("true", "yes", "1"):
                resume_from_checkpoint = True
            elif resume_from_checkpoint.strip().lower() in ("false", "no", "0", "none", ""):
                resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint."
                )
        elif isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
            if not os.path.exists(os.path.join(resume_from_checkpoint, COMPLETE_MARKER)):
                raise ValueError(
                    f"{resume_from_checkpoint} is not a complete UniAPL checkpoint (no {COMPLETE_MARKER}): its "
                    "writing was interrupted. Resume from an earlier checkpoint or with resume_from_checkpoint=True."
                )
        if isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
            check_checkpoint_files(resume_from_checkpoint, COMPLETE_MARKER)  # name a damaged file before loading it
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The latest `checkpoint-N` folder of `output_dir` that was completely written, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit() and os.path.isdir(path):
            if os.path.exists(os.path.join(path, COMPLETE_MARKER)):
                steps.append((int(name.split("-")[-1]), path))
            else:
                logger.warning("Skipping %s: its writing was interrupted (no %s).", path, COMPLETE_MARKER)
    return max(steps)[1] if steps else None


__all__ = ["UniAPLTrainer", "last_complete_checkpoint"]
