"""
LUFFY (Yan et al., "Learning to Reason under Off-Policy Guidance", arXiv 2504.14945): the expert's completion inside
the GRPO group of its prompt.

With `expert_in_group=True`, on every demonstration prompt of a training generation batch the expert's completion takes
the place of ONE of the `num_generations` rollouts of that prompt's group: the LAST row of the group. Rows come in
groups of `num_generations` consecutive rows over all processes (a process's rows start at
`process_index * len(rows)`, the arithmetic of `UniAPLTrainer._is_carrier`), so the expert row of a group is the row
whose global index `i` has `i % num_generations == num_generations - 1`; it lives on the process holding the group's
last row. The replacement happens in `_generate_single_turn`, before TRL decodes the completions and scores them, so:

- the expert row carries the expert's token ids, tokenized as for the SFT term (`SFTTerm.expert_token_ids`: the
  completion as the policy would produce it, ending in eos, truncated to `max_completion_length`);
- the task reward functions score it like any completion, and it enters its group's advantage normalisation through
  TRL's own code (group-relative advantage, `scale_rewards`, multi-reward aggregation): A_E is GRPO's advantage of the
  expert's reward within its group.

The expert's probabilities π_φ are unknown; LUFFY sets π_φ = 1, so the expert tokens' importance ratio is
π_θ/π_φ = π_θ, reshaped by f(x) = x/(x + γ) ("policy shaping", γ = `expert_shaping_gamma`, 0.1 in the paper; None:
f(x) = x), and never clipped. LUFFY's off-policy term is −A_E · f(π_θ(y_t | x, y_<t)) per expert token. TRL's loss is
not copied: at loss time the expert rows' per-token log-probabilities are replaced (in
`_get_per_token_logps_and_entropies`, only when called from the training loss) by

    ℓ_t = log1p(f(π_θ,t) − sg[f(π_θ,t)])        value 0, gradient ∇f(π_θ,t) = γ·π_θ,t / (π_θ,t + γ)² · ∇log π_θ,t

and their old (and reference, and vLLM sampling) log-probabilities are set to 0, their vLLM importance-sampling ratio
to 1. TRL's ratio on those tokens is then coef_1 = exp(ℓ_t − 0) = 1 + f − sg[f]: value exactly 1 (inside every clip
range: no clipping), gradient ∇f. Every loss type of TRL 1.16 then gives the expert row LUFFY's shaped off-policy
gradient, normalised as TRL normalises any token of that loss type (c = 1, except c = min(1, ε_high) for cispo, which
is why cispo is refused with ε_high < 1):

    ∇loss ∋ −(c / N) · A_E · Σ_{t ∈ expert tokens} ∇f(π_θ,t)

with N, for a micro-batch of B rows inside an accumulation window of G micro-steps:

- grpo, sapo: N = |y_E| · B · G (sequence mean, then batch mean); sapo's soft gate has slope 1 at ratio 1;
- bnpo: N = (completion tokens of the micro-batch) · G;
- dr_grpo: N = B · max_completion_length · G;
- dapo, cispo, vespo: N = num_items_in_batch / num_processes · G / steps_per_generation (tokens of the generation
  batch over all processes, per optimizer step and process); vespo's gamma weight is exactly 1 at ratio 1;
- luspo: N = B · G.

Under DDP the gradient is further averaged over processes, as for every token. `importance_sampling_level="sequence"`
gives the same gradient: the expert row's sequence ratio exp(mean_t ℓ_t) is 1 with gradient mean_t ∇f_t, and the
mask-sum over its tokens restores Σ_t ∇f_t. With `num_iterations > 1` the expert row's ratio is recomputed from the
current policy at every iteration (its old log-probabilities are 0: LUFFY's off-policy ratio has no old policy), while
the policy's own rollouts keep TRL's clipped ratio to the generation-time policy.

Other TRL options on the expert row:

- `beta > 0`: its reference log-probabilities are set to 0, so TRL's k3 KL term exp(ref − ℓ) − (ref − ℓ) − 1 is 0
  with zero gradient on it (also with `use_bias_correction_kl`): the KL penalty applies to the policy's own rollouts
  only (the k3 estimator needs samples of π_θ; the expert's are not). The logged `kl` averages over all tokens, the
  expert's counting 0.
- `off_policy_mask_threshold` (OPSM): its sampling log-probabilities are 0, so its KL to the sampler is 0: never
  masked.
- `use_vllm` with `vllm_importance_sampling_correction`: vLLM's log-probabilities of the replaced rollout are dropped
  (NaN, which TRL treats as "not scored": ratio 1, left out of the `sampling/*` metrics), and its importance-sampling
  ratio is set to 1.
- `top_entropy_quantile < 1`, entropy bonus, `mask_truncated_completions` (an expert completion truncated to
  `max_completion_length` has no eos) and TRL's completion metrics treat the expert row like any row.
- The logged `loss` counts the expert tokens at TRL's value for ratio 1 (−A_E per token, not −A_E·f(π_θ): only the
  gradient is LUFFY's), and `clip_ratio/*` counts them as unclipped.
- The discriminator does not take the expert row for a policy sample: it is left out of the fake samples and of
  adversarial scoring (A_adv = 0 on it). The SFT term is unchanged (set `sft_coef=0` for LUFFY alone).
- Evaluation batches are left as GRPO makes them: the expert is inserted in training batches only.

Refused: no demonstrations, `demonstration_ratio=0`, `num_generations < 2` (GRPOConfig refuses it first), cispo with
`epsilon_high < 1`, `delta <= 1`, tools, `environment_factory` and `rollout_func` (their rollouts are not one
`_generate_single_turn` call whose rows can be replaced).

Metrics (training): `luffy/expert_advantage` (mean A_E of the expert rows, over all processes), `luffy/expert_reward`
(their mean task reward, weighted sum over reward functions as TRL logs `reward`), `luffy/expert_ratio` (mean π_θ over
the expert tokens at loss time, the unshaped ratio π_θ/π_φ) and `luffy/expert_shaped_weight` (mean weight of
∇log π_θ in the expert tokens' gradient: γπ_θ/(π_θ + γ)², or π_θ without shaping).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import UniAPLConfig

# Key of the (B,) bool tensor that marks the expert rows in the generation batch TRL shuffles and splits.
EXPERT_MASK_KEY = "luffy_expert_mask"

# Loss types of TRL 1.16 whose gradient on the expert row is checked to be LUFFY's (module docstring; tests).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")

# The GRPOTrainer hooks LUFFY overrides, with their parameters in TRL 1.16 (merged into the trainer's TRL_HOOKS).
TRL_HOOKS = {
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ),
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
        "pixel_values",
        "image_grid_thw",
        "num_images",
        "pixel_attention_mask",
        "spatial_shapes",
        "num_tiles",
        "image_sizes",
        "token_type_ids",
        "mm_token_type_ids",
        "image_position_ids",
    ),
}


def validate_config(args: UniAPLConfig) -> None:
    """Refuse the LUFFY settings whose expert-row gradient is not LUFFY's (called at the end of `__post_init__`)."""
    gamma = args.expert_shaping_gamma
    if gamma is not None and not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(
            f"`expert_shaping_gamma` must be a finite number > 0 (LUFFY uses 0.1) or None (no shaping), got {gamma}."
        )
    if not args.expert_in_group:
        return
    if args.num_generations < 2:  # GRPOConfig refuses it first; kept in case it stops doing so
        raise ValueError(
            "`expert_in_group=True` replaces one of the `num_generations` rollouts of each demonstration prompt by "
            f"the expert's completion, so it needs `num_generations` >= 2, got {args.num_generations}."
        )
    if args.demonstration_ratio == 0.0:
        raise ValueError(
            "`expert_in_group=True` puts the expert's completion into the groups of demonstration prompts, but "
            "`demonstration_ratio=0` draws none. Set `demonstration_ratio` > 0 (or None), or `expert_in_group=False`."
        )
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"`expert_in_group=True` is checked for the loss types {list(SUPPORTED_LOSS_TYPES)} only, got "
            f"`loss_type={args.loss_type!r}`. Use one of them, or `expert_in_group=False`."
        )
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type == "cispo" and epsilon_high < 1.0:
        raise ValueError(
            f"With `loss_type='cispo'`, the expert row's ratio (exactly 1) is clipped to `epsilon_high`="
            f"{epsilon_high} < 1, so its off-policy gradient would be scaled down, which LUFFY never does (nor is any "
            "on-policy token at ratio 1 left unclipped). Set `epsilon_high` >= 1 (ScaleRL recommends 5.0) with "
            "`expert_in_group=True`."
        )
    if args.delta is not None and args.delta <= 1.0:
        raise ValueError(
            f"`delta={args.delta}` clips the ratio from above at <= 1, so the expert row's ratio (exactly 1) would "
            "get no gradient. Set `delta` > 1 + epsilon_high (TRL's recommendation) or None with "
            "`expert_in_group=True`."
        )


def check_streams(args: Any, streams: Any) -> None:
    """Refuse `expert_in_group=True` without demonstrations (called before the trainer builds the datasets)."""
    if getattr(args, "expert_in_group", False) and not streams.has_demonstrations:
        raise ValueError(
            "`expert_in_group=True` puts the expert's completion into the GRPO groups of demonstration prompts, but "
            "no demonstrations were given. Pass `demonstration_dataset=` (prompt + completion rows) or add rows with "
            "a `completion` to a map-style `train_dataset`, or set `expert_in_group=False`."
        )


class ExpertInGroup:
    """LUFFY's expert row for one `UniAPLTrainer`; the trainer's hook methods call into it (see the module docstring).

    Per generation batch: `start_batch` picks the expert rows, `insert_expert` puts the expert's token ids in their
    place, `record_rewards` keeps the task rewards for the metrics, `finish_batch` marks the rows in the output dict
    and neutralises their old / reference / sampling log-probabilities. Per micro-batch: `loss_context` (around the
    training loss) and `shape_logps` (on the policy's log-probabilities in that loss).
    """

    def __init__(self, trainer):
        if trainer.tools or trainer.environment_factories is not None or trainer.rollout_func is not None:
            raise ValueError(
                "`expert_in_group=True` does not support tools, `environment_factory` or `rollout_func`: their "
                "rollouts are not a single generation whose rows can be replaced by the expert's completion. Drop "
                "them or set `expert_in_group=False`."
            )
        self.trainer = trainer
        self.gamma = trainer.args.expert_shaping_gamma
        self.rows: list[int] = []  # this process's expert rows in the current generation batch
        self._pending_insert = False
        self._rewards: torch.Tensor | None = None  # (rows over all processes, reward functions)
        self._loss_inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    # Generation batch
    def is_expert_slot(self, row: int, num_rows: int) -> bool:
        """Whether this process's `row` (of `num_rows`) is the last of its group of `num_generations` rows."""
        trainer = self.trainer
        global_row = trainer.accelerator.process_index * num_rows + row
        return global_row % trainer.num_generations == trainer.num_generations - 1

    def start_batch(self, mode: str) -> None:
        """Pick this batch's expert rows: the last row of each demonstration prompt's group, in training only."""
        batch = self.trainer._batch
        num_rows = len(batch.is_demonstration)
        self.rows = (
            [row for row in range(num_rows) if batch.is_demonstration[row] and self.is_expert_slot(row, num_rows)]
            if mode == "train"
            else []
        )
        self._pending_insert = mode == "train"
        self._rewards = None

    def insert_expert(self, completion_ids: list, logprobs: list | None) -> tuple[list, list | None]:
        """The rollouts' completion ids, the expert's in place of the expert rows' (vLLM log-probabilities: NaN)."""
        if not self._pending_insert:
            return completion_ids, logprobs
        self._pending_insert = False
        expert_ids = self.trainer._batch.expert_ids
        if len(completion_ids) != len(expert_ids):
            raise RuntimeError(
                f"expert_in_group: generation returned {len(completion_ids)} completions for {len(expert_ids)} rows."
            )
        completion_ids = list(completion_ids)
        logprobs = list(logprobs) if logprobs is not None else None
        for row in self.rows:
            completion_ids[row] = list(expert_ids[row])
            if logprobs is not None:
                logprobs[row] = [float("nan")] * len(expert_ids[row])
        return completion_ids, logprobs

    def record_rewards(self, rewards_per_func: torch.Tensor) -> None:
        self._rewards = rewards_per_func

    def policy_rows(self, rows: list[int]) -> list[int]:
        """`rows` without the expert rows: the rows that are the policy's own samples (for the discriminator)."""
        expert = set(self.rows)
        return [row for row in rows if row not in expert]

    def finish_batch(self, output: dict[str, Any], mode: str) -> dict[str, Any]:
        """Mark the expert rows in TRL's batch and set their old / reference / sampling log-probabilities to 0 and
        their vLLM importance-sampling ratio to 1; log the expert rows' advantage and task reward."""
        if mode != "train":
            return output
        trainer = self.trainer
        advantages = output["advantages"]
        num_rows = advantages.shape[0]
        mask = torch.zeros(num_rows, dtype=torch.bool, device=advantages.device)
        mask[self.rows] = True
        for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps"):
            if output.get(key) is not None:
                output[key] = output[key].masked_fill(mask.unsqueeze(1), 0.0)
        if output.get("importance_sampling_ratio") is not None:
            output["importance_sampling_ratio"] = output["importance_sampling_ratio"].masked_fill(
                mask.unsqueeze(1), 1.0
            )
        output[EXPERT_MASK_KEY] = mask

        row_advantages = advantages if advantages.dim() == 1 else advantages.mean(dim=1)
        reward_sum = 0.0
        if self._rewards is not None:
            rewards_per_func = self._rewards
            weights = trainer.reward_weights.to(rewards_per_func.device).unsqueeze(0)
            rewards = (rewards_per_func * weights).nansum(dim=1)
            rewards[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
            start = trainer.accelerator.process_index * num_rows
            local_rewards = rewards[start : start + num_rows].to(advantages.device)
            reward_sum = torch.nan_to_num(local_rewards[mask], nan=0.0).sum().item()
            scored = (~torch.isnan(local_rewards) & mask).sum().item()
        else:
            scored = 0
        stats = torch.tensor(
            [row_advantages[mask].sum().item(), float(mask.sum().item()), reward_sum, float(scored)],
            device=trainer.accelerator.device,
        )
        advantage_sum, count, reward_total, reward_count = (
            trainer.accelerator.gather(stats).view(-1, 4).sum(0).tolist()
        )
        if count > 0:
            trainer._metrics[mode]["luffy/expert_advantage"].append(advantage_sum / count)
        if reward_count > 0:
            trainer._metrics[mode]["luffy/expert_reward"].append(reward_total / reward_count)
        self._rewards = None
        return output

    # Training loss
    @contextlib.contextmanager
    def loss_context(self, inputs: dict[str, Any]):
        """Around `GRPOTrainer.compute_loss` on a micro-batch: its policy log-probabilities get LUFFY's expert rows."""
        mask = inputs.get(EXPERT_MASK_KEY)
        if mask is None:  # evaluation batches carry no expert row
            yield
            return
        self._loss_inputs = (mask, inputs["completion_mask"])
        try:
            yield
        finally:
            self._loss_inputs = None

    def shape_logps(self, logps: torch.Tensor) -> torch.Tensor:
        """In the training loss only: the expert rows' log-probabilities replaced by log1p(f(π_θ) − sg[f(π_θ)])."""
        if self._loss_inputs is None:
            return logps
        mask, completion_mask = self._loss_inputs
        self._loss_inputs = None  # the loss's own forward pass only
        if logps.shape[0] != mask.shape[0]:
            raise RuntimeError(
                f"expert_in_group: the training loss scored {logps.shape[0]} rows, its micro-batch has "
                f"{mask.shape[0]}."
            )
        probs = logps.exp()
        shaped = probs / (probs + self.gamma) if self.gamma is not None else probs
        surrogate = torch.log1p(shaped - shaped.detach())
        expert_rows = mask.unsqueeze(1)
        shaped_logps = torch.where(expert_rows, surrogate, logps)

        # Metrics over all processes (every process runs this once per training micro-step).
        with torch.no_grad():
            tokens = expert_rows & completion_mask.bool()
            probs = probs.detach().float()
            weights = self.gamma * probs / (probs + self.gamma) ** 2 if self.gamma is not None else probs
            stats = torch.stack([probs[tokens].sum(), weights[tokens].sum(), tokens.sum().float()])
            trainer = self.trainer
            prob_sum, weight_sum, count = trainer.accelerator.gather(stats.reshape(1, 3)).sum(0).tolist()
            if count > 0:
                trainer._metrics["train"]["luffy/expert_ratio"].append(prob_sum / count)
                trainer._metrics["train"]["luffy/expert_shaped_weight"].append(weight_sum / count)
        return shaped_logps


__all__ = ["EXPERT_MASK_KEY", "ExpertInGroup", "SUPPORTED_LOSS_TYPES", "check_streams", "validate_config"]
