"""UniAPLTrainer: GRPO with expert demonstrations and an online discriminator, in one training stage."""

import copy
import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_config_model_id, is_async_callable, selective_log_softmax

from .config import UniAPLConfig
from .discriminator import (
    Discriminator,
    adversarial_reward,
    discriminator_lora_config,
    ensure_pad_token,
    js_estimate,
    load_discriminator_model,
    load_discriminator_tokenizer,
)
from .shared_discriminator import build_shared_discriminator, resolve_discriminator_type
from .streams import MixedRepeatSampler, demonstrations_per_batch, merge_streams, validate_row

logger = logging.getLogger(__name__)

DISCRIMINATOR_DIR = "discriminator"
UNIAPL_STATE_NAME = "uniapl_state.json"
COMPLETE_MARKER = "uniapl_checkpoint_complete.json"
ADVERSARIAL_REWARD_NAME = "adversarial"

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


def _as_uniapl_config(args: GRPOConfig, has_demonstrations: bool) -> UniAPLConfig:
    """A plain GRPOConfig (a GRPO script with the class swapped) becomes a UniAPLConfig with the UniAPL defaults, or
    with every UniAPL term off when there are no demonstrations, so that the run is exactly GRPO's."""
    config = copy.copy(args)
    config.__class__ = UniAPLConfig  # already validated by GRPOConfig.__post_init__; only our fields are missing
    for config_field in dataclasses.fields(UniAPLConfig):
        if not hasattr(config, config_field.name):
            setattr(config, config_field.name, config_field.default)
    if not has_demonstrations:
        config.sft_coef = 0.0
        config.adversarial_coef = 0.0
    return config


def _named_reward_func(reward_func, name: str):
    """Wrap a synchronous reward function so that an exception names the function and the rows that made it fail."""

    @functools.wraps(reward_func)
    def wrapped(prompts, completions, **kwargs):
        try:
            return reward_func(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            preview = [str(p)[:60] for p in prompts[:3]]
            raise RuntimeError(
                f"Reward function {name!r} raised {type(error).__name__}: {error} while scoring a batch of "
                f"{len(prompts)} completions (first prompts: {preview}). Fix the reward function, or return None for "
                "rows it cannot score."
            ) from error

    return wrapped


class UniAPLTrainer(GRPOTrainer):
    """
    Trainer for UniAPL (Unified Adversarial Preference Learning, arXiv 2509.25148): one training stage on mixed
    batches of expert demonstrations and preference prompts.

        L(θ) = L_GRPO(θ; advantages of r_task + λ·r_adv) + α(t)·NLL(expert completions)

    The objective is a reconstruction from the paper's abstract (see the README): the GRPO term is TRL's, untouched;
    the SFT term is CHORD-style (arXiv 2508.11408); r_adv is a GAIL-style reward from a discriminator trained online to
    tell the expert's completions from the policy's (GAIL; GAD arXiv 2511.10643), and λ can follow dual ascent on the
    discriminator's Jensen–Shannon estimate (the paper's constrained formulation).

    The only changes with respect to [`~trl.GRPOTrainer`] are:

    - the constructor also takes `demonstration_dataset`, `discriminator`, `discriminator_peft_config` and
      `discriminator_processing_class`, merges the demonstrations into the training data and, when the adversarial
      term is on, appends the discriminator's reward (named `"adversarial"`, weight λ) to the reward functions;
    - `_get_train_sampler` puts demonstration and preference prompts into every generation batch;
    - `_generate_and_score_completions` adds the tokenized expert completions to the batch;
    - `compute_loss` adds α(t)·NLL of the expert completions to `super().compute_loss(...)`;
    - `save_model`, `_save_checkpoint` and `_load_optimizer_and_scheduler` also save and restore the discriminator,
      its optimizer and λ; `train(resume_from_checkpoint=True)` skips a checkpoint whose writing was interrupted.

    With no demonstrations (and `sft_coef=0`, `adversarial_coef=0`, or a plain `GRPOConfig`), training is exactly
    GRPOTrainer's.

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks,
        optimizers, quantization_config, peft_config, tools, rollout_func, environment_factory:
            As in [`~trl.GRPOTrainer`]. `args` may be a [`UniAPLConfig`] or a plain `GRPOConfig`. Rows of
            `train_dataset` with a non-empty `completion` are demonstrations.
        demonstration_dataset ([`~datasets.Dataset`], *optional*):
            Demonstrations in prompt-completion format (standard or conversational, like `train_dataset`).
        discriminator ([`~transformers.PreTrainedModel`], *optional*):
            A sequence classifier with one label to use as the discriminator, instead of loading
            `args.discriminator_model_name_or_path`.
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
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        demonstration_dataset: Dataset | None = None,
        discriminator: PreTrainedModel | None = None,
        discriminator_peft_config=None,
        discriminator_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        streams = merge_streams(train_dataset, demonstration_dataset)
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = UniAPLConfig(f"{model_name.split('/')[-1]}-UniAPL")
            if not streams.has_demonstrations:
                args.sft_coef, args.adversarial_coef = 0.0, 0.0
        elif not isinstance(args, UniAPLConfig):
            args = _as_uniapl_config(args, streams.has_demonstrations)
        self._check_streams_against_config(args, streams)
        self._streams = streams

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=streams.dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )

        self._has_demonstrations = streams.has_demonstrations
        self.discriminator: Discriminator | None = None
        self.adversarial_coef = args.adversarial_coef  # λ; moves in "lagrangian" mode
        self._discriminator_state = {"last_update_step": None, "num_updates": 0, "skipped_updates": 0}
        self._collapse_streak = 0
        for i, reward_func in enumerate(self.reward_funcs):
            if not isinstance(reward_func, nn.Module) and not is_async_callable(reward_func):
                self.reward_funcs[i] = _named_reward_func(reward_func, self.reward_func_names[i])
        if self._has_demonstrations:
            prompts_per_batch = self.args.generation_batch_size // self.num_generations
            self._demonstrations_per_batch = demonstrations_per_batch(
                streams, prompts_per_batch, args.demonstration_ratio
            )
            logger.info(
                "UniAPL: %d of the %d prompts of each generation batch are demonstrations.",
                self._demonstrations_per_batch,
                prompts_per_batch,
            )
            if args.uses_discriminator:
                self.discriminator = self._build_discriminator(
                    model, discriminator, discriminator_peft_config, discriminator_processing_class, peft_config,
                    quantization_config,
                )  # fmt: skip
                self.reward_funcs.append(self._adversarial_rewards)
                self.reward_func_names.append(ADVERSARIAL_REWARD_NAME)
                self.reward_processing_classes.append(None)
                self.reward_weights = torch.cat([self.reward_weights, torch.tensor([self.adversarial_coef])])

    # ------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_streams_against_config(args: UniAPLConfig, streams) -> None:
        if streams.has_demonstrations:
            if args.demonstration_ratio == 0.0:
                raise ValueError(
                    f"`demonstration_ratio=0` but {len(streams.demonstration_indices)} demonstrations were given: "
                    "they would never be used. Set `demonstration_ratio` > 0 (or None for the default), or drop the "
                    "demonstrations."
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
        policy_id = policy if isinstance(policy, str) else get_config_model_id(self.accelerator.unwrap_model(
            self.model).config)  # fmt: skip
        kind = resolve_discriminator_type(
            args.discriminator_type, discriminator is not None, bool(args.discriminator_model_name_or_path),
            processing_class is not None, self.is_fsdp_enabled or self._is_zero3(),
        )  # fmt: skip
        if kind != "full_copy":  # LoRA + score head on the policy's own weights (or a frozen copy of them)
            return build_shared_discriminator(
                self.accelerator.unwrap_model(self.model), kind, self._tokenizer, args,
                discriminator_peft_config or peft_config, policy_id, self.accelerator.device,
            )  # fmt: skip
        path = args.discriminator_model_name_or_path or policy_id
        # Loading initialises the score head: do it on a forked RNG so the policy's random stream is unchanged.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            if discriminator is None:
                quantized = getattr(self.accelerator.unwrap_model(self.model), "is_loaded_in_4bit", False) or getattr(
                    self.accelerator.unwrap_model(self.model), "is_loaded_in_8bit", False
                )
                discriminator = load_discriminator_model(
                    path, args.discriminator_init_kwargs, quantization_config if quantized else None
                )
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
            discriminator,
            processing_class,
            uses_policy_tokens=uses_policy_tokens,
            learning_rate=args.discriminator_learning_rate,
            weight_decay=args.discriminator_weight_decay,
            max_grad_norm=args.discriminator_max_grad_norm,
            batch_size=args.per_device_train_batch_size,
        )

    def _is_zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    # ------------------------------------------------------------------------------------------------------------
    # Streams
    # ------------------------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------------------------------
    # Generation: add the expert completions to the batch
    # ------------------------------------------------------------------------------------------------------------
    def _generate(self, prompts: list):
        output = super()._generate(prompts)
        self._last_prompt_ids = output[0]  # the prompt exactly as the policy saw it, for the SFT and D inputs
        return output

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        if not self._has_demonstrations:
            if any(row.get("completion") is not None for row in inputs):
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
        self._batch_is_demonstration = is_demonstration
        self._batch_expert_completions = [row.get("completion") for row in inputs]
        self._batch_expert_ids = self._tokenize_expert_completions(inputs, is_demonstration, mode)
        if self.discriminator is not None:
            self.reward_weights[-1] = self._effective_adversarial_coef()

        output = super()._generate_and_score_completions(inputs)
        output.update(self._expert_batch(self._last_prompt_ids, self._batch_expert_ids, mode))
        return output

    def _tokenize_expert_completions(
        self, inputs: list[dict[str, Any]], is_demonstration: list[bool], mode: str
    ) -> list[list[int] | None]:
        """Expert completion token ids, rendered as the policy would produce them (ending with eos)."""
        tokenizer = self._tokenizer
        eos_token_id = tokenizer.eos_token_id
        expert_ids, truncated = [], 0
        for row, is_demo in zip(inputs, is_demonstration, strict=True):
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
            if len(ids) > self.max_completion_length:
                ids = ids[: self.max_completion_length]
                truncated += 1
            expert_ids.append(ids)
        num_demos = sum(is_demonstration)
        lengths = torch.tensor([len(ids) for ids in expert_ids if ids is not None], dtype=torch.float32)
        stats = torch.tensor(
            [lengths.sum().item(), float(num_demos), float(truncated)], device=self.accelerator.device
        )
        total_length, count, total_truncated = self.accelerator.gather(stats).view(-1, 3).sum(0).tolist()
        if count > 0:
            self._metrics[mode]["expert/mean_length"].append(total_length / count)
            self._metrics[mode]["expert/truncated_ratio"].append(total_truncated / count)
        if truncated:
            logger.warning(
                "%d expert completion(s) in this batch are longer than max_completion_length=%d tokens and were "
                "truncated for the SFT term and the discriminator.",
                truncated,
                self.max_completion_length,
            )
        return expert_ids

    def _expert_batch(
        self, prompt_ids: list[list[int]], expert_ids: list[list[int] | None], mode: str
    ) -> dict[str, torch.Tensor]:
        """
        Tensors for the SFT term. Each demonstration is repeated `num_generations` times in the batch; only the first
        copy of each group ("carrier" row) gets labels, so each demonstration counts once per step.
        """
        device = self.accelerator.device
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        offset = self.accelerator.process_index * len(prompt_ids)
        sequences, labels = [], []
        for i, (prompt, expert) in enumerate(zip(prompt_ids, expert_ids, strict=True)):
            carrier = expert is not None and (offset + i) % num_generations == 0
            if carrier:
                sequences.append(list(prompt) + list(expert))
                labels.append([-100] * len(prompt) + list(expert))
            else:
                sequences.append([])
                labels.append([])
        width = max(1, max(len(seq) for seq in sequences))
        pad_id = self._tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        label_ids = torch.full((len(sequences), width), -100, dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
            label_ids[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        local_tokens = (label_ids != -100).sum().to(device)
        global_tokens = self.accelerator.gather(local_tokens.reshape(1)).sum().float()
        if mode == "train":
            # Tokens per optimizer step over all ranks: a generation batch spans `steps_per_generation` micro-steps.
            tokens_per_step = global_tokens * self.args.gradient_accumulation_steps / self.args.steps_per_generation
        else:
            tokens_per_step = global_tokens
        # DDP averages gradients over ranks, hence the division by the world size.
        normalizer = torch.clamp(tokens_per_step, min=1.0) / self.accelerator.num_processes
        return {
            "expert_input_ids": input_ids.to(device),
            "expert_attention_mask": attention_mask.to(device),
            "expert_labels": label_ids.to(device),
            "sft_token_normalizer": normalizer.reshape(()),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self._has_demonstrations:
            return loss
        sft_coef = self.sft_coef_at(self.state.global_step)
        return loss + sft_coef * self._sft_loss(model, inputs, sft_coef)

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

    def _sft_loss(self, model, inputs: dict[str, torch.Tensor], sft_coef: float) -> torch.Tensor:
        """Summed NLL of this micro-batch's expert completion tokens, divided by the per-step token count.

        Runs on every rank at every micro-step, with a one-token dummy row when the micro-batch holds no
        demonstration, so DeepSpeed ZeRO-3 and FSDP see the same forward passes on every rank."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["expert_labels"]
        rows = (labels != -100).any(dim=1).nonzero(as_tuple=True)[0]
        input_ids, attention_mask = inputs["expert_input_ids"], inputs["expert_attention_mask"]
        if rows.numel() == 0:
            input_ids, attention_mask, labels = input_ids[:1, :1], torch.ones_like(input_ids[:1, :1]), labels[:1, :1]
        else:
            width = int(attention_mask[rows].sum(dim=1).max().item())
            input_ids, attention_mask, labels = (t[rows, :width] for t in (input_ids, attention_mask, labels))
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
        self._metrics[mode]["sft/coef"].append(sft_coef)
        return nll_sum / inputs["sft_token_normalizer"]

    # ------------------------------------------------------------------------------------------------------------
    # Discriminator and adversarial reward
    # ------------------------------------------------------------------------------------------------------------
    def _effective_adversarial_coef(self) -> float:
        """λ, held at 0 while the discriminator warms up."""
        if self.state.global_step < self.args.discriminator_warmup_steps:
            return 0.0
        return self.adversarial_coef

    def _discriminator_inputs(self, rows: list[int], completions: list[Any], completion_ids: list[list[int]]):
        """Discriminator batches for the given rows' prompts followed by `completions[row]` (policy's or expert's):
        the policy's token ids when it shares the policy's tokenizer, else the re-rendered text."""
        discriminator = self.discriminator
        if discriminator.uses_policy_tokens:
            return discriminator.encode_ids([list(self._last_prompt_ids[i]) + list(completion_ids[i]) for i in rows])
        return discriminator.encode_texts([self._batch_prompts[i] for i in rows], [completions[i] for i in rows])

    def _adversarial_rewards(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        """Reward function (called by GRPO with the other reward functions on every rank): trains the discriminator
        when an update is due, then returns r_adv for each completion."""
        args, discriminator = self.args, self.discriminator
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        self._batch_prompts = prompts
        demo_rows = [i for i, is_demo in enumerate(self._batch_is_demonstration) if is_demo]

        # Real inputs: each distinct expert completion once; `real_index` maps every demo row to its real row.
        real_keys, real_rows, real_index = {}, [], []
        for i in demo_rows:
            key = (tuple(self._last_prompt_ids[i]), tuple(self._batch_expert_ids[i]))
            if key not in real_keys:
                real_keys[key] = len(real_rows)
                real_rows.append(i)
            real_index.append(real_keys[key])
        real_index = torch.tensor(real_index, dtype=torch.long)
        real_batches = self._discriminator_inputs(real_rows, self._batch_expert_completions, self._batch_expert_ids)
        fake_batches = self._discriminator_inputs(demo_rows, completions, completion_ids)

        last_update = self._discriminator_state["last_update_step"]
        step = self.state.global_step
        update = None
        if mode == "train" and (last_update is None or step - last_update >= args.discriminator_update_interval):
            losses = []
            for _ in range(args.discriminator_steps):
                update = discriminator.update(
                    real_batches, fake_batches, args.discriminator_loss, args.discriminator_label_smoothing, real_index
                )
                losses.append(update.loss)
                if not update.applied:
                    self._discriminator_state["skipped_updates"] += 1
                    logger.warning(
                        "Discriminator update skipped at step %d: non-finite loss or gradient (loss=%s). The "
                        "discriminator keeps its previous weights.",
                        step,
                        update.loss,
                    )
            self._discriminator_state["last_update_step"] = step
            self._discriminator_state["num_updates"] += 1
            finite = [loss for loss in losses if math.isfinite(loss)]
            self._metrics[mode]["discriminator/loss"].append(sum(finite) / len(finite) if finite else float("nan"))
            self._metrics[mode]["discriminator/skipped_updates"].append(
                float(self._discriminator_state["skipped_updates"])
            )

        scope_rows = demo_rows if args.adversarial_reward_scope == "demonstrations" else list(range(len(prompts)))
        if update is not None and args.discriminator_score_in_update_pass:
            # The update's forward pass already scored the expert completions and the policy's completions of the
            # demonstration prompts (before its last optimizer step, as most GAIL implementations score); only the
            # preference rows in scope need a pass of their own. The two iterates never meet inside one group of
            # `num_generations` completions (a prompt is either a demonstration or not), so group-relative
            # advantages compare scores of the same discriminator.
            real_logits, fake_logits = update.real_logits, update.fake_logits
            demo_rows_set = set(demo_rows)
            other_rows = [row for row in scope_rows if row not in demo_rows_set]
            other_logits = discriminator.score(self._discriminator_inputs(other_rows, completions, completion_ids))
            logits_by_row = dict(zip(demo_rows, fake_logits)) | dict(zip(other_rows, other_logits))
            policy_logits = torch.stack([logits_by_row[row] for row in scope_rows]) if scope_rows else other_logits
        else:
            # Score after the update: the policy is rewarded by the discriminator it is now facing.
            policy_logits = discriminator.score(self._discriminator_inputs(scope_rows, completions, completion_ids))
            real_logits = discriminator.score(real_batches)[real_index.to(device)] if demo_rows else policy_logits[:0]
            row_position = {row: position for position, row in enumerate(scope_rows)}
            fake_logits = policy_logits[[row_position[i] for i in demo_rows]] if demo_rows else policy_logits[:0]
        self._log_discriminator_metrics(real_logits, fake_logits, mode)

        rewards = adversarial_reward(policy_logits, args.adversarial_reward, args.adversarial_reward_clip)
        nonfinite = ~torch.isfinite(rewards)
        rewards = torch.where(nonfinite, torch.zeros_like(rewards), rewards)
        counts = torch.tensor([float(nonfinite.sum()), rewards.sum().item(), float(rewards.numel())], device=device)
        num_nonfinite, reward_sum, reward_count = self.accelerator.gather(counts).view(-1, 3).sum(0).tolist()
        if num_nonfinite:
            logger.warning(
                "The discriminator returned %d non-finite scores; their adversarial reward is set to 0.",
                int(num_nonfinite),
            )
        self._metrics[mode]["adversarial/nonfinite_rewards"].append(num_nonfinite)
        self._metrics[mode]["adversarial/reward_mean"].append(reward_sum / max(reward_count, 1.0))
        self._metrics[mode]["adversarial/coef"].append(self._effective_adversarial_coef())

        output: list[float | None] = [None] * len(prompts)
        for position, row in enumerate(scope_rows):
            output[row] = rewards[position].item()
        return output

    def _log_discriminator_metrics(self, real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str) -> None:
        real_finite, fake_finite = real_logits[torch.isfinite(real_logits)], fake_logits[torch.isfinite(fake_logits)]
        stats = torch.tensor(
            [
                torch.nn.functional.logsigmoid(real_finite).sum().item(),
                float(real_finite.numel()),
                (real_finite > 0).sum().item(),
                torch.nn.functional.logsigmoid(-fake_finite).sum().item(),
                float(fake_finite.numel()),
                (fake_finite < 0).sum().item(),
            ],
            device=self.accelerator.device,
        )
        real_log_d, num_real, real_correct, fake_log_1md, num_fake, fake_correct = (
            self.accelerator.gather(stats).view(-1, 6).sum(0).tolist()
        )
        if num_real == 0 or num_fake == 0:
            return
        acc_real, acc_fake = real_correct / num_real, fake_correct / num_fake
        divergence = js_estimate(real_log_d, fake_log_1md, num_real, num_fake)
        self._metrics[mode]["discriminator/acc_real"].append(acc_real)
        self._metrics[mode]["discriminator/acc_fake"].append(acc_fake)
        self._metrics[mode]["discriminator/js_estimate"].append(divergence)
        if mode != "train":
            return
        balanced_accuracy = (acc_real + acc_fake) / 2
        degenerate = balanced_accuracy >= 0.99 or abs(balanced_accuracy - 0.5) <= 0.02
        self._collapse_streak = self._collapse_streak + 1 if degenerate else 0
        collapsed = self._collapse_streak >= self.args.discriminator_collapse_patience
        self._metrics[mode]["discriminator/collapsed"].append(float(collapsed))
        if collapsed and self._collapse_streak % self.args.discriminator_collapse_patience == 0:
            logger.warning(
                "Discriminator collapse: balanced accuracy %.3f for %d consecutive updates (%s). Consider a lower "
                "`discriminator_learning_rate`, label smoothing, or more `discriminator_steps`.",
                balanced_accuracy,
                self._collapse_streak,
                "it wins outright" if balanced_accuracy >= 0.99 else "it cannot tell expert from policy",
            )
        if self.args.adversarial_coef_mode == "lagrangian" and self.state.global_step >= (
            self.args.discriminator_warmup_steps
        ):
            updated = self.adversarial_coef + self.args.adversarial_coef_lr * (
                divergence - self.args.divergence_target
            )
            self.adversarial_coef = min(max(updated, 0.0), self.args.adversarial_coef_max)

    # ------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.discriminator is not None and self.args.should_save:
            self.discriminator.save_pretrained(os.path.join(output_dir or self.args.output_dir, DISCRIMINATOR_DIR))

    def _uniapl_state(self) -> dict[str, Any]:
        return {"adversarial_coef": self.adversarial_coef, "collapse_streak": self._collapse_streak,
                **self._discriminator_state}  # fmt: skip

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
        if self.args.should_save and os.path.exists(marker):
            os.remove(marker)  # overwriting an older checkpoint of the same step: incomplete until rewritten
        # The parent deletes older checkpoints (save_total_limit) before returning: rotate only once this one is
        # complete, so that an interruption while writing it never leaves the run without a complete checkpoint.
        save_total_limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        if not self.args.should_save:
            return
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
