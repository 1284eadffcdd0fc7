"""The adversarial term λ·A_adv: the discriminator's update–score–log cycle, λ and its controller, their state.

    A = A_task + λ·A_adv,    A_adv(i) = (r_adv(i) − mean_{group(i)} r_adv) / (std_batch(r_adv − group mean) + 1e-4)

r_adv comes from one of two scorers:

- the online discriminator D (see [`~trl_uniapl.discriminator`], the default), trained on expert completions (real)
  against the policy's completions (fake): those of the same demonstration prompts when the generation batch holds
  demonstrations, else the SFT batch's expert completions against the preference rollouts (`demonstration_ratio=0`);
- a FIXED reference-conditioned scorer (`reference_scorer`, the paper's published design: a POLAR-style model that
  scores a rollout by its consistency with the expert's answer to the same prompt; see
  [`~trl_uniapl.reference_scorers`]), which only scores the rollouts of demonstration prompts, the only ones with a
  reference; preference rows are unscored (A_adv = 0) and counted in `reference/unscored`.

λ is held at 0 for `discriminator_warmup_steps` after the SFT-only warm-up, and follows dual ascent on D's
Jensen–Shannon estimate in `"lagrangian"` mode. With `discriminator_freeze_after_updates`, D stops training after that
many updates and keeps scoring.
"""

import contextlib
import json
import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import get_config_model_id, nanstd

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
from .reference_scorers import describe_scorer, is_model_spec, load_reference_scorer
from .shared_discriminator import build_shared_discriminator, resolve_discriminator_type

logger = logging.getLogger(__name__)

DISCRIMINATOR_DIR = "discriminator"
REFERENCE_SCORER_FILE = "reference_scorer.json"


class AdversarialTerm:
    """
    The adversarial term of a [`UniAPLTrainer`]: built by the trainer when λ can be non-zero, called from its hooks.

    Interface: `coef` (the λ a batch's advantages use now), `advantages(mode)` (A_adv of this process's rows, training
    D when an update is due), `save_pretrained`, `save_state` and `load_state`. Exactly one of `discriminator` (online)
    and `reference_scorer` (fixed) is set.
    """

    def __init__(
        self,
        trainer: Any,
        policy: "str | PreTrainedModel",
        discriminator: PreTrainedModel | None,
        discriminator_peft_config: Any,
        processing_class: PreTrainedTokenizerBase | None,
        peft_config: Any,
        quantization_config: Any,
        reference_scorer: Any = None,
    ):
        self.trainer = trainer
        self.args = trainer.args
        self.adversarial_coef = self.args.adversarial_coef  # λ; moves in "lagrangian" mode
        self.state = {"last_update_step": None, "num_updates": 0, "skipped_updates": 0, "generation_batches": 0}
        self.collapse_streak = 0
        self.discriminator: Discriminator | None = None
        self.reference_scorer = None
        spec = reference_scorer if reference_scorer is not None else self.args.reference_scorer
        if spec is not None:
            self.reference_scorer = self._load_reference_scorer(spec, quantization_config)
        else:
            self.discriminator = self._build_discriminator(
                policy, discriminator, discriminator_peft_config, processing_class, peft_config, quantization_config
            )

    def _load_reference_scorer(self, spec: Any, quantization_config: Any):
        """The fixed scorer. A model is loaded frozen, with the policy's quantization like the discriminator, and never
        enters an optimizer."""
        if not is_model_spec(spec):
            return load_reference_scorer(spec)
        args, trainer = self.args, self.trainer
        unwrapped_policy = trainer.accelerator.unwrap_model(trainer.model)
        return load_reference_scorer(
            spec,
            template=args.reference_scorer_template,
            init_kwargs=args.reference_scorer_init_kwargs,
            quantization_config=policy_quantization_config(unwrapped_policy, quantization_config),
            device=trainer.accelerator.device,
        )

    # ------------------------------------------------------------------------------------------------------------
    # The discriminator's model
    # ------------------------------------------------------------------------------------------------------------
    def _build_discriminator(
        self, policy, discriminator, discriminator_peft_config, processing_class, peft_config, quantization_config
    ) -> Discriminator:
        trainer, args = self.trainer, self.args
        unwrapped_policy = trainer.accelerator.unwrap_model(trainer.model)
        policy_id = policy if isinstance(policy, str) else get_config_model_id(unwrapped_policy.config)
        kind = resolve_discriminator_type(
            args.discriminator_type,
            discriminator is not None,
            bool(args.discriminator_model_name_or_path),
            processing_class is not None,
            trainer.is_fsdp_enabled or self._is_zero3(),
        )
        if kind != "full_copy":  # LoRA + score head on the policy's own weights (or a frozen copy of them)
            return build_shared_discriminator(
                unwrapped_policy,
                kind,
                trainer._tokenizer,
                args,
                discriminator_peft_config or peft_config,
                policy_id,
                trainer.accelerator.device,
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
                self._check_reads_policy_tokens(discriminator, policy_id)
            if discriminator_peft_config is None and peft_config is not None:
                discriminator_peft_config = discriminator_lora_config(peft_config)
            if discriminator_peft_config is not None:
                from peft import get_peft_model

                discriminator = get_peft_model(discriminator, discriminator_peft_config)
        if processing_class is None:
            same_checkpoint = args.discriminator_model_name_or_path is None or path == policy_id
            processing_class = trainer._tokenizer if same_checkpoint else load_discriminator_tokenizer(path)
        uses_policy_tokens = processing_class is trainer._tokenizer
        ensure_pad_token(processing_class, discriminator)
        if not getattr(discriminator, "is_loaded_in_4bit", False) and not getattr(
            discriminator, "is_loaded_in_8bit", False
        ):
            discriminator.to(trainer.accelerator.device)
        return Discriminator(
            discriminator, processing_class, uses_policy_tokens=uses_policy_tokens, **optimizer_settings(args)
        )

    def _check_reads_policy_tokens(self, discriminator: PreTrainedModel, policy_id: str) -> None:
        """A `discriminator=` instance without its own tokenizer reads the policy's token ids: only sound when it is
        the policy's checkpoint (same name and vocabulary), else it silently reads other tokens' embeddings."""
        discriminator_id = getattr(discriminator.config, "_name_or_path", "") or "<unnamed>"
        discriminator_vocab = discriminator.get_input_embeddings().num_embeddings
        policy_vocab = len(self.trainer._tokenizer)
        if discriminator_id != policy_id or discriminator_vocab < policy_vocab:
            raise ValueError(
                f"The `discriminator` passed ({discriminator_id}, {discriminator_vocab} token embeddings) is not the "
                f"policy's checkpoint ({policy_id}, a tokenizer of {policy_vocab} tokens), so it cannot read the "
                "policy's token ids. Pass its tokenizer as `discriminator_processing_class=` (completions are then "
                "re-tokenized for it), or build the discriminator from the policy's checkpoint."
            )

    def _is_zero3(self) -> bool:
        trainer = self.trainer
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    # ------------------------------------------------------------------------------------------------------------
    # λ
    # ------------------------------------------------------------------------------------------------------------
    @property
    def coef(self) -> float:
        """λ as the next batch's advantages use it: 0 during the SFT-only warm-up and the discriminator's warm-up."""
        policy_steps = self.trainer.state.global_step - self.trainer.sft_warmup_steps
        if policy_steps < self.args.discriminator_warmup_steps:
            return 0.0
        return self.adversarial_coef

    @property
    def frozen(self) -> bool:
        """Whether the discriminator has had its `discriminator_freeze_after_updates` updates and no longer trains."""
        limit = self.args.discriminator_freeze_after_updates
        return limit is not None and self.state["num_updates"] >= limit

    # ------------------------------------------------------------------------------------------------------------
    # One generation batch: update, score, A_adv
    # ------------------------------------------------------------------------------------------------------------
    def _inputs(self, sequences: list[tuple[list[int], Any, Any, list[int]]]):
        """Discriminator batches for (prompt ids, prompt, completion, completion ids) rows: the policy's token ids
        when D shares the policy's tokenizer, else the re-rendered text."""
        if self.discriminator.uses_policy_tokens:
            return self.discriminator.encode_ids([prompt_ids + ids for prompt_ids, _, _, ids in sequences])
        return self.discriminator.encode_texts(
            [prompt for _, prompt, _, _ in sequences], [completion for _, _, completion, _ in sequences]
        )

    def _rows(self, rows: list[int], completions: list[Any], completion_ids: list[Any]):
        batch = self.trainer._batch
        return self._inputs(
            [(batch.prompt_ids[row], batch.prompts[row], completions[row], completion_ids[row]) for row in rows]
        )

    @contextlib.contextmanager
    def _rng(self):
        """The discriminator's own random stream (dropout), so its passes leave the policy's sampling untouched."""
        device = self.trainer.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + self.state["generation_batches"])
            yield

    def _real_and_fake(self, demo_rows: list[int], scope_rows: list[int], mode: str):
        """(real batches, fake rows, real_index): each distinct expert completion of the batch once against the
        policy's completions of the same prompts; with no demonstration prompt in the batch (`demonstration_ratio=0`)
        the SFT batch's expert completions against every rollout in scope, paired round robin."""
        trainer, batch = self.trainer, self.trainer._batch
        device = trainer.accelerator.device
        if not demo_rows and mode == "train" and trainer.sft is not None and trainer.sft.batches is not None:
            dataset = trainer._streams.dataset
            experts = trainer.sft.step_demonstrations(trainer.state.global_step)
            real_batches = self._inputs(
                [(prompt_ids, dataset[i]["prompt"], dataset[i]["completion"], ids) for prompt_ids, ids, i in experts]
            )
            real_index = torch.arange(len(scope_rows), device=device) % max(len(experts), 1)
            return real_batches, scope_rows, real_index
        real_keys, real_rows, real_index = {}, [], []
        for row in demo_rows:
            key = (tuple(batch.prompt_ids[row]), tuple(batch.expert_ids[row]))
            if key not in real_keys:
                real_keys[key] = len(real_rows)
                real_rows.append(row)
            real_index.append(real_keys[key])
        real_batches = self._rows(real_rows, batch.expert_completions, batch.expert_ids)
        return real_batches, demo_rows, torch.tensor(real_index, dtype=torch.long, device=device)

    def advantages(self, mode: str) -> torch.Tensor:
        """
        A_adv for this process's rows: trains the discriminator when an update is due (or asks the fixed reference
        scorer), scores the completions in scope (r_adv, see `adversarial_reward`), then centres them per group and
        scales them over the whole batch (all processes) with [`group_relative_advantages`]. Rows out of scope or with
        a non-finite score are unscored (0).
        """
        args, discriminator, batch = self.args, self.discriminator, self.trainer._batch
        num_rows = len(batch.is_demonstration)
        demo_rows = [row for row, is_demo in enumerate(batch.is_demonstration) if is_demo]
        scope_rows = demo_rows if args.adversarial_reward_scope == "demonstrations" else list(range(num_rows))
        expert_in_group = self.trainer._luffy
        if expert_in_group is not None:  # LUFFY's expert rows are no policy samples: no fake sample, A_adv = 0
            demo_rows, scope_rows = expert_in_group.policy_rows(demo_rows), expert_in_group.policy_rows(scope_rows)
        if self.reference_scorer is not None:
            return self._reference_advantages(demo_rows, num_rows, mode)
        real_batches, fake_rows, real_index = self._real_and_fake(demo_rows, scope_rows, mode)
        fake_batches = self._rows(fake_rows, batch.completions, batch.completion_ids)

        update = None
        with self._rng():
            if mode == "train":
                self.state["generation_batches"] += 1
                due = (self.state["generation_batches"] - 1) % args.discriminator_update_interval == 0
                if due and not self.frozen:
                    update = self._update(real_batches, fake_batches, real_index)
            if update is not None and args.discriminator_score_in_update_pass:
                # The update's forward pass already scored the expert completions and the policy's completions it
                # trained on (before its optimizer step, as most GAIL implementations score); only the other rows in
                # scope need a pass of their own. A group is either a demonstration prompt or not, so the two
                # iterates never meet inside one group, where A_adv compares scores.
                real_logits, fake_logits = update.real_logits, update.fake_logits
                fake_set = set(fake_rows)
                other_rows = [row for row in scope_rows if row not in fake_set]
                other_logits = discriminator.score(self._rows(other_rows, batch.completions, batch.completion_ids))
                logits_by_row = dict(zip(fake_rows, fake_logits)) | dict(zip(other_rows, other_logits))
                policy_logits = torch.stack([logits_by_row[row] for row in scope_rows]) if scope_rows else other_logits
            else:
                # Score after the update: the policy is rewarded by the discriminator it is now facing.
                policy_logits = discriminator.score(self._rows(scope_rows, batch.completions, batch.completion_ids))
                real_logits = discriminator.score(real_batches)[real_index] if fake_rows else policy_logits[:0]
                position = {row: index for index, row in enumerate(scope_rows)}
                fake_logits = policy_logits[[position[row] for row in fake_rows]] if fake_rows else policy_logits[:0]
        expert_score = self._log_discriminator_metrics(real_logits, fake_logits, mode, updated=update is not None)

        # Without expert completions in the batch (an evaluation batch of preference prompts only), "score" has no
        # reference; its offset cancels in the group centring anyway, and only matters for clipping.
        expert_score = 0.0 if expert_score is None else expert_score
        scores = adversarial_reward(policy_logits, args.adversarial_reward, args.adversarial_reward_clip, expert_score)
        return self._group_advantages(scope_rows, scores, num_rows, mode)

    def _reference_advantages(self, demo_rows: list[int], num_rows: int, mode: str) -> torch.Tensor:
        """A_adv from the fixed reference scorer: each rollout of a demonstration prompt scored against that prompt's
        own expert completion; rows without a reference (preference prompts) are unscored."""
        trainer, batch = self.trainer, self.trainer._batch
        device = trainer.accelerator.device
        scores = self.reference_scorer(  # positionally: the protocol's names are a convention, not a requirement
            [batch.prompts[row] for row in demo_rows],
            [batch.expert_completions[row] for row in demo_rows],
            [batch.completions[row] for row in demo_rows],
        )
        scores = torch.tensor([float(score) for score in scores], dtype=torch.float32, device=device)
        if scores.numel() != len(demo_rows):
            raise ValueError(
                f"The reference scorer returned {scores.numel()} scores for {len(demo_rows)} rows: it must return one "
                "float per row of its inputs."
            )
        finite = scores[torch.isfinite(scores)]
        stats = torch.tensor(
            [float(finite.numel()), finite.sum().item(), (finite**2).sum().item(), float(num_rows - len(demo_rows))],
            device=device,
        )
        count, total, total_sq, no_reference = trainer.accelerator.gather(stats).view(-1, 4).sum(0).tolist()
        metrics = trainer._metrics[mode]
        metrics["reference/unscored"].append(no_reference)
        if count > 0:
            mean = total / count
            metrics["reference/score_mean"].append(mean)
            metrics["reference/score_std"].append(max(total_sq / count - mean**2, 0.0) ** 0.5)
        return self._group_advantages(demo_rows, scores, num_rows, mode)

    def _group_advantages(self, scope_rows: list[int], scores: torch.Tensor, num_rows: int, mode: str) -> torch.Tensor:
        """A_adv of this process's rows from the scores of `scope_rows` (NaN or out of scope: unscored, 0)."""
        trainer, batch = self.trainer, self.trainer._batch
        device = trainer.accelerator.device
        in_scope = torch.zeros(num_rows, dtype=torch.bool, device=device)
        in_scope[scope_rows] = True
        rewards = torch.full((num_rows,), float("nan"), device=device)
        rewards[scope_rows] = scores.to(device)
        nonfinite = in_scope & ~torch.isfinite(rewards)
        rewards[nonfinite] = float("nan")
        all_rewards = trainer.accelerator.gather(rewards)
        num_unscored = int(trainer.accelerator.gather(nonfinite.sum().reshape(1)).sum().item())
        if num_unscored and trainer.accelerator.is_main_process:
            logger.warning(
                "The %s returned %d non-finite scores; those completions get no adversarial advantage.",
                "discriminator" if self.discriminator is not None else "reference scorer",
                num_unscored,
            )
        num_generations = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        all_advantages = group_relative_advantages(all_rewards, num_generations)
        metrics = trainer._metrics[mode]
        metrics["adversarial/unscored"].append(float(num_unscored))
        reward_mean = torch.nanmean(all_rewards).nan_to_num().item()
        metrics["rewards/adversarial/mean"].append(reward_mean)
        metrics["adversarial/reward_mean"].append(reward_mean)
        metrics["rewards/adversarial/std"].append(nanstd(all_rewards).nan_to_num().item())
        process = trainer.accelerator.process_index
        batch.adversarial_rewards = rewards
        batch.adversarial_advantages = all_advantages[process * num_rows : (process + 1) * num_rows]
        return batch.adversarial_advantages

    def _update(self, real_batches, fake_batches, real_index: torch.Tensor) -> DiscriminatorUpdate:
        """`discriminator_steps` optimizer steps of the discriminator on this batch; returns the last one."""
        args, trainer = self.args, self.trainer
        losses = []
        for _ in range(args.discriminator_steps):
            update = self.discriminator.update(
                real_batches, fake_batches, args.discriminator_loss, args.discriminator_label_smoothing, real_index
            )
            losses.append(update.loss)
            if not update.applied:
                self.state["skipped_updates"] += 1
                logger.warning(
                    "Discriminator update skipped at step %d: non-finite loss or gradient (loss=%s). The "
                    "discriminator keeps its previous weights.",
                    trainer.state.global_step,
                    update.loss,
                )
        self.state["last_update_step"] = trainer.state.global_step
        self.state["num_updates"] += 1
        finite = [loss for loss in losses if math.isfinite(loss)]
        metrics = trainer._metrics["train"]
        metrics["discriminator/loss"].append(sum(finite) / len(finite) if finite else float("nan"))
        metrics["discriminator/skipped_updates"].append(float(self.state["skipped_updates"]))
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
        trainer = self.trainer
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
            device=trainer.accelerator.device,
        )
        count, real_sum, real_correct, fake_correct, real_log_d, fake_log_1md, pair_correct, gap_sum = (
            trainer.accelerator.gather(stats).view(-1, 8).sum(0).tolist()
        )
        metrics = trainer._metrics[mode]
        metrics["discriminator/frozen"].append(float(self.frozen))
        if count == 0:
            return None
        if self.args.discriminator_loss == "bce":
            acc_real, acc_fake = real_correct / count, fake_correct / count
            divergence = js_estimate(real_log_d, fake_log_1md, count, count)
            metrics["discriminator/acc_real"].append(acc_real)
            metrics["discriminator/acc_fake"].append(acc_fake)
            metrics["discriminator/js_estimate"].append(divergence)
            accuracy = (acc_real + acc_fake) / 2
        else:
            divergence = None
            accuracy = pair_correct / count
            metrics["discriminator/pairwise_acc"].append(accuracy)
            metrics["discriminator/score_gap"].append(gap_sum / count)
        if mode == "train" and updated:
            self._after_update(accuracy, divergence)
        return real_sum / count

    def _after_update(self, accuracy: float, divergence: float | None) -> None:
        """Once per discriminator update: count degenerate updates (collapse) and take the dual step on λ."""
        args = self.args
        degenerate = accuracy >= 0.99 or abs(accuracy - 0.5) <= 0.02
        self.collapse_streak = self.collapse_streak + 1 if degenerate else 0
        collapsed = self.collapse_streak >= args.discriminator_collapse_patience
        self.trainer._metrics["train"]["discriminator/collapsed"].append(float(collapsed))
        if collapsed and self.collapse_streak % args.discriminator_collapse_patience == 0:
            logger.warning(
                "Discriminator collapse: %s accuracy %.3f for %d consecutive updates (%s). Consider a lower "
                "`discriminator_learning_rate`, label smoothing, or more `discriminator_steps`.",
                "balanced" if args.discriminator_loss == "bce" else "pairwise",
                accuracy,
                self.collapse_streak,
                "it wins outright" if accuracy >= 0.99 else "it cannot tell expert from policy",
            )
        policy_steps = self.trainer.state.global_step - self.trainer.sft_warmup_steps
        if args.adversarial_coef_mode == "lagrangian" and policy_steps >= args.discriminator_warmup_steps:
            updated = self.adversarial_coef + args.adversarial_coef_lr * (divergence - args.divergence_target)
            self.adversarial_coef = min(max(updated, 0.0), args.adversarial_coef_max)

    # ------------------------------------------------------------------------------------------------------------
    # Persistence
    # ------------------------------------------------------------------------------------------------------------
    def _scorer_record(self) -> dict[str, Any]:
        return {"reference_scorer": describe_scorer(self.reference_scorer), "adversarial_coef": self.adversarial_coef}

    def save_pretrained(self, output_dir: str) -> None:
        """The trained discriminator (`output_dir/discriminator/`), or which fixed reference scorer was used."""
        if self.reference_scorer is not None:
            with open(os.path.join(output_dir, REFERENCE_SCORER_FILE), "w") as f:
                json.dump(self._scorer_record(), f, indent=2, default=str)
            return
        self.discriminator.save_pretrained(os.path.join(output_dir, DISCRIMINATOR_DIR))

    def save_state(self, checkpoint_dir: str) -> None:
        if self.reference_scorer is not None:  # nothing trains: the record says which scorer the run used
            self.save_pretrained(checkpoint_dir)
            return
        state = {"adversarial_coef": self.adversarial_coef, "collapse_streak": self.collapse_streak, **self.state}
        self.discriminator.save_training_state(os.path.join(checkpoint_dir, DISCRIMINATOR_DIR), state)

    def load_state(self, checkpoint_dir: str) -> None:
        if self.reference_scorer is not None:
            path = os.path.join(checkpoint_dir, REFERENCE_SCORER_FILE)
            if not os.path.exists(path):
                raise ValueError(
                    f"The checkpoint {checkpoint_dir} has no {REFERENCE_SCORER_FILE}: it was written by a run without "
                    "a reference scorer (e.g. with an online discriminator), or its writing was interrupted. Resume "
                    "with the run's own settings, or from an earlier checkpoint."
                )
            with open(path) as f:
                saved = json.load(f)["reference_scorer"]
            current = json.loads(json.dumps(describe_scorer(self.reference_scorer), default=str))
            if saved != current:
                logger.warning(
                    "Resuming with another reference scorer than the checkpoint's: %s (checkpoint: %s).",
                    current,
                    saved,
                )
            return
        state_dir = os.path.join(checkpoint_dir, DISCRIMINATOR_DIR)
        if not os.path.exists(os.path.join(state_dir, "discriminator_state.json")):
            raise ValueError(
                f"The checkpoint {checkpoint_dir} has no discriminator state ({state_dir}): it was written by a run "
                "without a discriminator or its writing was interrupted. Resume from an earlier checkpoint."
            )
        state = self.discriminator.load_training_state(state_dir)
        self.adversarial_coef = state["adversarial_coef"]
        self.collapse_streak = state["collapse_streak"]
        self.state = {key: state[key] for key in self.state}
