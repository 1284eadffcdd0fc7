"""The discriminator D_φ(x, y): a sequence classifier with one logit, telling expert completions from the policy's.

It is a plain module with its own AdamW optimizer, kept outside the policy's optimizer and outside the policy's
DeepSpeed/FSDP engine: across processes its gradients are all-reduced explicitly, so every rank holds the same
weights. It is trained in alternation with the policy (GAIL, Ho & Ermon 2016; GAD, arXiv 2511.10643) on the expert
completions of a batch (real) against the policy's completions of the same prompts (fake, detached).
"""

import contextlib
import copy
import json
import logging
import math
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "discriminator_optimizer.pt"
STATE_NAME = "discriminator_state.json"


def adversarial_reward(
    logits: torch.Tensor, kind: str, clip: float | None, expert_score: float | None = None
) -> torch.Tensor:
    """Reward for the policy from the discriminator logit s = logit D: gail −log(1−D), airl s, logd log D, score
    s − `expert_score` (the mean logit of the batch's expert completions: the only reading of a Bradley–Terry logit,
    whose offset is arbitrary). Clipped to [−clip, clip] when `clip` is set."""
    if kind == "gail":
        rewards = F.softplus(logits)  # −log(1 − σ(s))
    elif kind == "airl":
        rewards = logits.clone()
    elif kind == "logd":
        rewards = F.logsigmoid(logits)
    elif kind == "score":
        if expert_score is None:
            raise ValueError("The 'score' adversarial reward needs the mean expert score (`expert_score`).")
        rewards = logits - expert_score
    else:
        raise ValueError(f"Unknown adversarial reward {kind!r}; use 'gail', 'airl', 'logd' or 'score'.")
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards


def group_relative_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """
    The adversarial advantage of every completion of a generation batch (all ranks, in group order):

        A_adv(i) = (r(i) − mean_{j ∈ group(i)} r(j)) / (std_batch(r − group mean) + 1e-4)

    Centred within each group of `num_generations` completions of one prompt (GRPO's baseline), then divided by one
    standard deviation over the whole batch, so that A_adv has unit scale over the batch while groups that the
    discriminator cannot tell apart keep an advantage near 0 (a per-group std would blow them up to unit scale). λ then
    weighs A_adv against TRL's task advantage, itself of unit scale. Rows with a NaN reward (unscored) are left out of
    the statistics and get an advantage of 0.
    """
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    scored = centred[~torch.isnan(centred)]
    scale = scored.std(unbiased=True) if scored.numel() > 1 else centred.new_zeros(())
    advantages = centred / (torch.nan_to_num(scale, nan=0.0) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def discriminator_loss_sum(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) losses on the real and fake sides; the caller divides by global counts.

    `bce`: −log D(real) − log(1 − D(fake)), with one-sided label smoothing ε of the real label (target 1 − ε). `bt`:
    −(1 − ε)·log σ(s_real − s_fake) − ε·log σ(s_fake − s_real) over aligned pairs, the Bradley–Terry loss with the
    pair's label smoothed by ε (conservative BT, as DPO's `label_smoothing`); returned as the real side, the fake side
    is 0.
    """
    if kind == "bce":
        real = F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, 1.0 - label_smoothing), reduction="sum"
        )
        fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="sum")
        return real, fake
    if kind == "bt":
        margin = real_logits - fake_logits
        pair_loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
        return pair_loss.sum(), fake_logits.new_zeros(())
    raise ValueError(f"Unknown discriminator loss {kind!r}; use 'bce' or 'bt'.")


class DiscriminatorUpdate(NamedTuple):
    """What [`Discriminator.update`] returns.

    Attributes:
        loss (`float`): the global loss of the step (over all ranks).
        applied (`bool`): whether the optimizer step was applied (False when the loss or a gradient was not finite).
        real_logits (`torch.Tensor`): this rank's logits of the real rows, aligned with the fake rows, computed by the
            step's forward pass (before its optimizer step), detached.
        fake_logits (`torch.Tensor`): the same for this rank's fake rows.
    """

    loss: float
    applied: bool
    real_logits: torch.Tensor
    fake_logits: torch.Tensor


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def optimizer_settings(args: Any) -> dict[str, Any]:
    """The [`Discriminator`] arguments a [`UniAPLConfig`] sets: its AdamW optimizer and the rows per forward pass."""
    return {
        "learning_rate": args.discriminator_learning_rate,
        "weight_decay": args.discriminator_weight_decay,
        "max_grad_norm": args.discriminator_max_grad_norm,
        "batch_size": args.per_device_train_batch_size,
    }


class Discriminator:
    """
    Discriminator model, tokenizer and optimizer, with the few operations UniAPL needs.

    Args:
        model (`PreTrainedModel`): a sequence classifier with `num_labels=1` (possibly a peft model).
        processing_class (`PreTrainedTokenizerBase`): its tokenizer.
        uses_policy_tokens (`bool`): whether it reads the policy's token ids directly (same tokenizer) or re-tokenizes
            the text with its own tokenizer.
        learning_rate, weight_decay, max_grad_norm: of its AdamW optimizer.
        batch_size (`int`): rows per forward pass.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processing_class: PreTrainedTokenizerBase,
        uses_policy_tokens: bool,
        learning_rate: float,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        batch_size: int = 8,
    ):
        self.model = model
        self.processing_class = processing_class
        self.uses_policy_tokens = uses_policy_tokens
        self.max_grad_norm = max_grad_norm
        self.batch_size = max(1, batch_size)
        self.trainable_parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable_parameters:
            raise ValueError(
                "The discriminator has no trainable parameter. A quantized discriminator needs LoRA: pass a "
                "`peft_config` (or `discriminator_peft_config`)."
            )
        self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=learning_rate, weight_decay=weight_decay)
        self.pad_token_id = processing_class.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_ids(self, sequences: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """Right-pad token-id sequences into micro-batches of `batch_size` rows."""
        batches = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(seq) for seq in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, : len(seq)] = 1
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
        return batches

    def encode_texts(self, prompts: list[Any], completions: list[Any]) -> list[dict[str, torch.Tensor]]:
        """Render prompt + completion with the discriminator's own tokenizer (chat template if conversational)."""
        tokenizer = self.processing_class
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                messages = prompt + completion
                if getattr(tokenizer, "chat_template", None):
                    texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
            else:
                texts.append(prompt + completion)
        batches = []
        for start in range(0, len(texts), self.batch_size):
            encoded = tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            )
            batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        return batches

    def regroup(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The rows of `batches`, in order, re-padded into as few micro-batches of `batch_size` rows as they fill."""
        sequences = [
            ids[mask.bool()].tolist()
            for batch in batches
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        return self.encode_ids(sequences)

    def logits(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One logit per row, in fp32."""
        device = self.device
        outputs = []
        for batch in batches:
            output = self.model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            outputs.append(output.logits[:, 0].float())
        if not outputs:
            return torch.zeros(0, device=device)
        return torch.cat(outputs)

    @torch.no_grad()
    def score(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.logits(batches)
        finally:
            self.model.train(was_training)

    def update(
        self,
        real_batches: list[dict[str, torch.Tensor]],
        fake_batches: list[dict[str, torch.Tensor]],
        loss_type: str,
        label_smoothing: float,
        real_index: torch.Tensor | None = None,
    ) -> DiscriminatorUpdate:
        """
        One optimizer step on this rank's real and fake rows, with gradients summed over all ranks.

        `real_index` maps each fake row to its row in `real_batches` (the real rows are deduplicated). Returns the
        global loss, whether the step was applied (False when the loss or a gradient was not finite: the step is
        skipped on every rank) and the logits of the step's forward pass, which callers may reuse as scores instead of
        a second pass. Every rank must call this, even with no rows.
        """
        self.model.train()
        with torch.enable_grad():
            # One model call over the real and fake rows together: the same logits and loss as a call per side, in
            # fewer, fuller calls (what launch-bound small batches on a GPU want; on CPU it measured the same time).
            num_real = sum(len(batch["input_ids"]) for batch in real_batches)
            all_logits = self.logits(self.regroup(real_batches + fake_batches))
            real_logits, fake_logits = all_logits[:num_real], all_logits[num_real:]
            if real_index is not None:
                real_logits = real_logits[real_index.to(real_logits.device)]
            device = self.device
            counts = _all_reduce_sum(torch.tensor([float(len(fake_logits))], device=device))
            num_rows = max(counts.item(), 1.0)
            real_loss, fake_loss = discriminator_loss_sum(real_logits, fake_logits, loss_type, label_smoothing)
            loss = (real_loss + fake_loss) / num_rows
            if loss.requires_grad:
                loss.backward()
        # Ranks with no rows contribute zero gradients, so every rank joins the same all-reduces.
        for param in self.trainable_parameters:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        global_loss = _all_reduce_sum(loss.detach().reshape(1).float().clone())
        grads = [param.grad for param in self.trainable_parameters]
        for grad in grads:
            _all_reduce_sum(grad)
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        applied = bool(torch.isfinite(global_loss).all()) and bool(torch.isfinite(grad_norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return DiscriminatorUpdate(global_loss.item(), applied, real_logits.detach(), fake_logits.detach())

    def save_pretrained(self, output_dir: str) -> None:
        """Weights (or adapter + score head) and tokenizer, reloadable with `from_pretrained`."""
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.processing_class.save_pretrained(output_dir)

    def load_weights(self, input_dir: str) -> None:
        """Load weights written by `save_pretrained` into the current model."""
        from safetensors.torch import load_file

        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict

            state_dict = load_file(os.path.join(input_dir, "adapter_model.safetensors"))
            result = set_peft_model_state_dict(self.model, state_dict)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Unexpected discriminator adapter keys in {input_dir}: {result.unexpected_keys[:5]}")
            return
        index_path = os.path.join(input_dir, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_file(os.path.join(input_dir, shard)))
        else:
            state_dict = load_file(os.path.join(input_dir, "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [key for key in missing if key not in tied]
        if missing or unexpected:
            raise ValueError(
                f"The discriminator checkpoint in {input_dir} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )

    def save_training_state(self, output_dir: str, state: dict[str, Any]) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_NAME))
        with open(os.path.join(output_dir, STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)

    def load_training_state(self, input_dir: str) -> dict[str, Any]:
        self.load_weights(input_dir)
        optimizer_state = torch.load(os.path.join(input_dir, OPTIMIZER_NAME), map_location=self.device)
        self.optimizer.load_state_dict(optimizer_state)
        with open(os.path.join(input_dir, STATE_NAME)) as f:
            return json.load(f)


@contextlib.contextmanager
def outside_zero3_init():
    """Load with DeepSpeed ZeRO-3's `zero.Init` switched off: under ZeRO-3 `from_pretrained` would otherwise partition
    the discriminator's weights across ranks, but it is a plain module with its own optimizer that must hold its full
    weights on every rank (its gradients are all-reduced explicitly)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    config_ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = config_ref


def load_discriminator_model(
    model_name_or_path: str,
    init_kwargs: dict[str, Any] | None,
    quantization_config: Any = None,
) -> PreTrainedModel:
    """Load a sequence classifier with one logit; a missing or wrong path raises a ValueError that says what to fix."""
    init_kwargs = dict(init_kwargs or {})
    if quantization_config is not None and "quantization_config" not in init_kwargs:
        init_kwargs["quantization_config"] = quantization_config
    if "quantization_config" not in init_kwargs:
        init_kwargs.setdefault("dtype", torch.float32)  # a full-weight discriminator trains in fp32 by default
    try:
        with outside_zero3_init():
            return AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=1, **init_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the discriminator from {model_name_or_path!r} as a sequence classifier: {error}. Set "
            "`discriminator_model_name_or_path` to a local directory or Hub id of a model with a "
            "SequenceClassification head, or pass `discriminator=` a model instance."
        ) from error


def policy_quantization_config(policy: PreTrainedModel, trainer_quantization_config: Any = None) -> Any:
    """The quantization of the policy however it was set (the trainer's `quantization_config`, `model_init_kwargs`, or
    a model passed already quantized), or None for a policy in full precision."""
    if not (getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False)):
        return None
    if trainer_quantization_config is not None:
        return trainer_quantization_config
    config = getattr(getattr(policy, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(config)
    return config


def load_discriminator_tokenizer(model_name_or_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the discriminator's tokenizer from {model_name_or_path!r}: {error}. Pass "
            "`discriminator_processing_class=`."
        ) from error


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token (its eos) when it has none, and tell the model which id is padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The discriminator's tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path!r}) has neither "
                "a pad token nor an eos token, so padded batches cannot be scored. Set one before training, e.g. "
                "`tokenizer.pad_token = tokenizer.unk_token` or `tokenizer.add_special_tokens({'pad_token': '<pad>'})`"
                " (then resize the discriminator's embeddings)."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The discriminator's tokenizer has no pad token; using its eos token %r.", tokenizer.eos_token)
    model.config.pad_token_id = tokenizer.pad_token_id
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "config"):
        base.config.pad_token_id = tokenizer.pad_token_id


def discriminator_lora_config(policy_peft_config: Any) -> Any:
    """The policy's LoRA settings, retargeted to a sequence classifier (its `score` head is trained in full)."""
    from peft import TaskType

    config = copy.deepcopy(policy_peft_config)
    config.task_type = TaskType.SEQ_CLS
    modules_to_save = list(getattr(config, "modules_to_save", None) or [])
    config.modules_to_save = [m for m in modules_to_save if m not in ("lm_head", "embed_tokens")] or None
    return config


def js_estimate(real_log_d_sum: float, fake_log_1md_sum: float, num_real: float, num_fake: float) -> float:
    """Jensen–Shannon estimate max(0, log 2 + ½(E_real log D + E_fake log(1 − D))) in nats.

    The bound is only a lower bound of JS for the optimal D; a weak discriminator makes it negative, which would read
    as "closer than identical" and push a Lagrangian λ down. JS ≥ 0, so the estimate is clamped at 0."""
    if num_real == 0 or num_fake == 0:
        return float("nan")
    return max(0.0, math.log(2.0) + 0.5 * (real_log_d_sum / num_real + fake_log_1md_sum / num_fake))
