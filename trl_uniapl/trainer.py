"""UniAPLTrainer: GRPO with expert demonstrations and an online discriminator, in one training stage."""

import contextlib
import functools
import inspect
import json
import logging
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import get_config_model_id, is_async_callable

from . import luffy
from .adversarial_term import AdversarialTerm
from .checkpoints import COMPLETE_MARKER, check_checkpoint_files
from .config import UniAPLConfig
from .sft_term import SFTTerm
from .streams import GenerationBatch, MixedRepeatSampler, demonstrations_per_batch, merge_streams, validate_row

logger = logging.getLogger(__name__)

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
    "_tokenize_prompts": ("self", "prompts"),
    "_prepare_inputs": ("self", "generation_batch"),
    **luffy.TRL_HOOKS,
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


class UniAPLTrainer(GRPOTrainer):
    """
    Trainer for UniAPL (Unified Adversarial Preference Learning, arXiv 2509.25148): one training stage on mixed
    batches of expert demonstrations and preference prompts.

        L(θ) = L_GRPO(θ; A_task + λ·A_adv) + α(t)·NLL(expert completions)

    The objective is a reconstruction (docs/method.md). The GRPO term is TRL's, untouched, and A_task is the advantage
    TRL computes from the task rewards alone. With the default configuration the run is staged, the paper's SFT →
    A-GRPO: the first half SFT only (`sft_warmup_steps=0.5`), then this objective with α = 0 (`sft_coef=0`);
    `sft_warmup_steps=0` with `sft_coef > 0` gives the one-stage mix. The two terms UniAPL adds each live in a module
    of their own, which this class only attaches to GRPOTrainer's hooks:

    - [`~trl_uniapl.sft_term.SFTTerm`]: α(t)·NLL, the token-mean NLL of the demonstrations each optimizer step reads
      (CHORD-style, arXiv 2508.11408), from a batch of its own (`sft_per_device_train_batch_size`) or from the
      generation batch, and the SFT-only warm-up (`sft_warmup_steps`);
    - [`~trl_uniapl.adversarial_term.AdversarialTerm`]: λ·A_adv, r_adv centred per group and scaled over the batch,
      from an online discriminator (GAIL; GAD arXiv 2511.10643) or a fixed reference-conditioned scorer (the paper's
      published design), with λ fixed or following dual ascent on the discriminator's Jensen–Shannon estimate;
    - optionally [`~trl_uniapl.luffy.ExpertInGroup`] (`expert_in_group`, LUFFY arXiv 2504.14945).

    The only changes with respect to [`~trl.GRPOTrainer`] are:

    - the constructor also takes `demonstration_dataset`, `discriminator`, `discriminator_peft_config`,
      `discriminator_processing_class` and `reference_scorer`, merges the demonstrations into the training data and
      builds the terms;
    - `_get_train_sampler` puts demonstration and preference prompts into every generation batch;
    - `_generate` and `_calculate_rewards` record the prompt token ids and completions of the batch (unchanged);
    - `_generate_and_score_completions` adds λ·A_adv to the advantages (training the discriminator when an update is
      due) and gives the SFT term the batch's demonstrations when it reads them from there;
    - `compute_loss` adds α(t)·NLL of the expert completions to `super().compute_loss(...)`;
    - during the SFT-only warm-up, `training_step` is Trainer's own step, `_prepare_inputs` generates nothing,
      `compute_loss` is the SFT term alone, and `create_scheduler` stages the learning rate;
    - with `expert_in_group`, `_generate_single_turn` and `_get_per_token_logps_and_entropies` put the expert's
      completion into its group and give its tokens LUFFY's off-policy ratio;
    - `save_model`, `_save_checkpoint` and `_load_optimizer_and_scheduler` also save and restore the discriminator,
      its optimizer and λ (or record the fixed scorer); `train(resume_from_checkpoint=True)` skips a checkpoint whose
      writing was interrupted.

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
        reference_scorer (callable, *optional*):
            A fixed reference-conditioned scorer `(prompts, references, completions, **kwargs) -> list[float]` to use
            instead of the online discriminator (takes precedence over `args.reference_scorer`); see
            [`~trl_uniapl.reference_scorers`].
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
        reference_scorer: Any = None,
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
        self.sft: SFTTerm | None = None
        self.adversarial: AdversarialTerm | None = None
        self._luffy = luffy.ExpertInGroup(self) if args.expert_in_group else None  # the expert inside its group
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
        self.sft = SFTTerm(self)
        if args.uses_discriminator:
            self.adversarial = AdversarialTerm(
                self,
                model,
                discriminator,
                discriminator_peft_config,
                discriminator_processing_class,
                kwargs.get("peft_config"),
                kwargs.get("quantization_config"),
                reference_scorer,
            )
        elif reference_scorer is not None:
            raise ValueError(
                "A `reference_scorer` was passed but the adversarial term is off (`adversarial_coef=0`): it would "
                "never be called. Set `adversarial_coef` > 0 (its weight λ), or drop the scorer."
            )

    @property
    def discriminator(self):
        """The online discriminator ([`~trl_uniapl.discriminator.Discriminator`]), or None without one."""
        return self.adversarial.discriminator if self.adversarial is not None else None

    @staticmethod
    def _check_streams_against_config(args: UniAPLConfig, streams) -> None:
        luffy.check_streams(args, streams)
        if streams.has_demonstrations:
            own_batch = args.sft_per_device_train_batch_size is not None
            if args.demonstration_ratio == 0.0 and not (own_batch and (args.sft_coef > 0 or args.sft_warmup_steps)):
                raise ValueError(
                    f"`demonstration_ratio=0` but {len(streams.demonstration_indices)} demonstrations were given: "
                    "no generation batch holds them and no SFT batch reads them, so they would never be used. Set "
                    "`demonstration_ratio` > 0 (or None for the default), or `sft_coef` > 0 with "
                    "`sft_per_device_train_batch_size`, or drop the demonstrations."
                )
            steps_per_generation, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
            if args.sft_coef > 0 and not own_batch and steps_per_generation % accumulation != 0:
                raise ValueError(
                    f"`steps_per_generation={steps_per_generation}` is not a multiple of "
                    f"`gradient_accumulation_steps={accumulation}`: an optimizer step would span several generation "
                    "batches, so the SFT term could not be normalised by the exact token count of each step's "
                    "demonstrations. Leave `steps_per_generation` unset (it defaults to "
                    "`gradient_accumulation_steps`), set it to a multiple of it, or give the SFT term its own batch "
                    "(`sft_per_device_train_batch_size`)."
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

    @property
    def sft_warmup_steps(self) -> int:
        """Optimizer steps of this run's SFT-only warm-up (`sft_warmup_steps` resolved against the run's length)."""
        return self.args.get_sft_warmup_steps(self.state.max_steps) if self.sft is not None else 0

    def _in_sft_warmup(self) -> bool:
        return self.sft is not None and self.model.training and self.sft.in_warmup(self.state.global_step)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """In the SFT-only warm-up, Trainer's own step on the SFT term alone: GRPOTrainer's step would count a policy
        micro-step, so its generation cycle would start mid-way once the policy phase begins."""
        if self._in_sft_warmup():
            return Trainer.training_step(self, model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _prepare_inputs(self, generation_batch):
        """No generation, no reward call during the SFT-only warm-up: the SFT term reads its own batch."""
        if self._in_sft_warmup():
            return {}
        return super()._prepare_inputs(generation_batch)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With an SFT-only warm-up, a constant `sft_warmup_learning_rate` (default: `learning_rate`) during it, then
        the configured schedule (`lr_scheduler_type`, its warm-up) over the policy steps, as an SFT run then a GRPO
        run would have."""
        warmup_steps = self.args.get_sft_warmup_steps(num_training_steps) if self.sft is not None else 0
        if warmup_steps == 0 or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        policy_schedule = super().create_scheduler(max(num_training_steps - warmup_steps, 1), optimizer)
        if not isinstance(policy_schedule, LambdaLR):
            raise ValueError(
                f"`sft_warmup_steps` needs a step-wise learning-rate schedule, but `lr_scheduler_type="
                f"{self.args.lr_scheduler_type!r}` builds a {type(policy_schedule).__name__}. Use e.g. 'linear', "
                "'cosine' or 'constant'."
            )
        warmup_factor = (self.args.sft_warmup_learning_rate or self.args.learning_rate) / self.args.learning_rate
        policy_factors = list(policy_schedule.lr_lambdas)

        def staged(factor):
            return lambda step: warmup_factor if step < warmup_steps else factor(step - warmup_steps)

        self.lr_scheduler = LambdaLR(policy_schedule.optimizer, [staged(factor) for factor in policy_factors])
        return self.lr_scheduler

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
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._luffy is not None:  # the expert rows' task rewards, for LUFFY's metrics
            self._luffy.record_rewards(rewards_per_func)
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """With `expert_in_group` (LUFFY), the expert's completion ids replace the last rollout of each demonstration
        prompt's group, before TRL decodes and scores the completions."""
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if self._luffy is not None:
            completion_ids, logprobs = self._luffy.insert_expert(completion_ids, logprobs)
        return completion_ids, logprobs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """With `expert_in_group` (LUFFY), in the training loss, the expert rows' log-probabilities become
        log1p(f(π_θ) − sg[f(π_θ)]) (value 0, gradient ∇f(π_θ)); unchanged everywhere else."""
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if self._luffy is not None:
            logps = self._luffy.shape_logps(logps)
        return logps, entropies, aux_loss

    def _is_carrier(self, row: int, num_rows: int, mode: str) -> bool:
        """Whether this process's `row` (of `num_rows`) is the first of its group of `num_generations` copies of one
        prompt over all processes: a demonstration counts once per generation batch, through its carrier row."""
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        return (self.accelerator.process_index * num_rows + row) % num_generations == 0

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        """GRPO's batch, with λ·A_adv added to its advantages and the SFT term's share of the batch prepared."""
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
            expert_ids=self.sft.tokenize_generation_batch(inputs, is_demonstration, mode),
        )
        if self._luffy is not None:  # this batch's expert rows
            self._luffy.start_batch(mode)

        output = super()._generate_and_score_completions(inputs)

        if self.adversarial is not None:
            applied_coef = self.adversarial.coef  # before the dual step of this batch's update
            adversarial_advantages = self.adversarial.advantages(mode)
            if applied_coef != 0.0:
                output["advantages"] = output["advantages"] + applied_coef * adversarial_advantages
            self._metrics[mode]["adversarial/coef"].append(applied_coef)
        if self.args.sft_coef > 0:
            self.sft.prepare_generation_batch(self._batch, mode)
        if self._luffy is not None:  # mark the expert rows, neutralise their old/ref/sampling log-probs
            output = self._luffy.finish_batch(output, mode)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._in_sft_warmup():
            return self.sft.loss(model, "train", coef=1.0)
        # With LUFFY, the expert rows of this micro-batch get its off-policy ratio in TRL's loss.
        with self._luffy.loss_context(inputs) if self._luffy is not None else contextlib.nullcontext():
            loss = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if self.sft is None or self.args.sft_coef == 0:
            return loss
        mode = "train" if self.model.training else "eval"
        sft_coef = self.sft.coef_at(self.state.global_step)
        if sft_coef == 0:  # the same on every process, so ZeRO-3/FSDP still see the same forward passes
            self._metrics[mode]["sft/coef"].append(sft_coef)
            return loss
        return loss + self.sft.loss(model, mode, sft_coef)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.adversarial is not None and self.args.should_save:
            self.adversarial.save_pretrained(output_dir or self.args.output_dir)

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
            if self.adversarial is not None:
                self.adversarial.save_state(checkpoint_dir)
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
        if checkpoint is not None and self.adversarial is not None:
            self.adversarial.load_state(checkpoint)

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
