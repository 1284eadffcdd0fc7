"""A discriminator that borrows the policy's weights: a LoRA adapter and a score head on the policy's own backbone.

The default discriminator used to be a second, fully trainable copy of the policy; on one GPU that more than doubled
GRPO's memory. Here the discriminator is

    D(x, y) = score(h_last(x ⊕ y)),  h = the policy's backbone with a LoRA adapter of its own on its linear layers

and only the adapter and the `Linear(hidden, 1)` score head are trained (its own AdamW, as before). Its parameters live
in a module of their own, outside the policy: the policy's optimizer, its DDP wrapper, its checkpoints and its
`save_model` never see them. The adapter is attached with forward hooks that exist only during a discriminator pass,
so a policy pass (generation, loss, reference) runs exactly the policy's modules. During a discriminator pass:

- a PEFT policy runs with its own adapter disabled (peft's `disable_adapter`, the same switch TRL uses for its
  reference model), so the discriminator reads the frozen (possibly 4-bit) base plus its own adapter;
- every policy parameter is frozen (`requires_grad=False`) and restored afterwards, so the discriminator's backward
  never writes a gradient into the policy and no DDP hook fires;
- nothing here touches the random stream: the trainer runs every discriminator pass on a forked RNG of its own
  (`AdversarialTerm._rng`, seeded per generation batch), so the discriminator's dropout (if any) never
  consumes the policy's random stream, and a resumed run draws the same masks without any saved RNG state.

With a fully fine-tuned policy the backbone is the policy's current weights (they move as the policy trains; the
discriminator's adapter and head follow it), which adds no weights to memory. `discriminator_type="frozen_copy"`
puts the adapter on a frozen copy of the backbone in the training dtype instead (the weights once more, no gradients or
optimizer state); `docs/benchmarks.md` measures both.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import DISCRIMINATOR_TYPES  # noqa: F401 - re-exported
from .discriminator import Discriminator, optimizer_settings

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Sub-modules of a peft model that are adapter weights, not base layers: the discriminator never targets them.
_PEFT_PARTS = re.compile(r"(^|\.)(lora_\w+|modules_to_save)(\.|$)")


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so 4-bit bases are covered too.
    return isinstance(module, nn.Linear)


def _is_linear4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # a 4-bit layer exists only once bitsandbytes is imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _target_matches(name: str, target_modules: Any) -> bool:
    """peft's rule: "all-linear", a regex string matched against the full name, or names matched as a suffix."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in target_modules)


def _checkpointing(module: nn.Module) -> bool:
    # transformers 5 renamed `is_gradient_checkpointing` (deprecated) to `is_activation_checkpointing`.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(module), name) or hasattr(module, name):
            return bool(getattr(module, name))
    return False


class _LoraDelta(nn.Module):
    """scaling · B(A(dropout(x))), added to a base layer's output; B starts at zero, so D starts as backbone + head."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default LoRA initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class SharedBackboneClassifier(nn.Module):
    """
    Sequence classifier with one logit made of a LoRA adapter and a score head on a borrowed transformer backbone.

    Args:
        policy (`nn.Module`): the (unwrapped) policy, a causal LM or a `PeftModel` around one.
        r, alpha, dropout, target_modules: LoRA settings of the discriminator's adapter (`target_modules` as in peft:
            `"all-linear"`, a regex or a list of module names).
        pad_token_id (`int` or `None`): the score is read at the last token that is not padding (the rule of
            transformers' `*ForSequenceClassification`, so a saved adapter reloads into one with the same logits).
        frozen_copy (`bool`): put the adapter on a frozen copy of the backbone (in `copy_dtype`), not the policy's.
        copy_dtype (`torch.dtype`, *optional*): dtype of that copy.
    """

    def __init__(
        self,
        policy: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        target_modules: Any = "all-linear",
        pad_token_id: int | None = None,
        frozen_copy: bool = False,
        copy_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        # Tuples are not registered as sub-modules: the policy's weights stay out of this module's parameters, state
        # dict, `.to()` and optimizer.
        self._peft = (policy,) if _is_peft_model(policy) and not frozen_copy else ()
        causal_lm = policy.get_base_model() if _is_peft_model(policy) else policy
        self.backbone_prefix = causal_lm.base_model_prefix
        backbone = causal_lm.base_model
        if backbone is causal_lm:
            raise ValueError(
                f"{type(causal_lm).__name__} exposes no transformer backbone (`base_model_prefix`), so the "
                "discriminator cannot share its weights. Set `discriminator_type='full_copy'`."
            )
        if frozen_copy:
            backbone = copy.deepcopy(backbone)
            if copy_dtype is not None:
                backbone.to(copy_dtype)
            backbone.requires_grad_(False)
            self.backbone = backbone  # registered: it belongs to the discriminator (moved and counted with it)
        else:
            self._borrowed = (backbone,)
        self.config = copy.copy(backbone.config)
        self.config.pad_token_id = pad_token_id
        self.pad_token_id = pad_token_id
        self.lora_settings = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}

        self._targets: dict[str, nn.Module] = {}  # peft-style module name (relative to the backbone) -> base layer
        deltas = {}
        for name, module in backbone.named_modules():
            if not _is_linear(module) or _PEFT_PARTS.search(name):
                continue
            clean = re.sub(r"\.base_layer$", "", name)
            # peft resolves "all-linear" to names relative to the causal LM ("model.layers.0..."): match both.
            if not (
                _target_matches(clean, target_modules)
                or _target_matches(f"{self.backbone_prefix}.{clean}", target_modules)
            ):
                continue
            self._targets[clean] = module
            delta = _LoraDelta(module.in_features, module.out_features, r, alpha, dropout)
            deltas[clean.replace(".", "__")] = delta.to(module.weight.device)
        if not deltas:
            raise ValueError(
                f"The discriminator's LoRA `target_modules={target_modules!r}` matched no linear layer of the "
                f"policy's backbone ({type(backbone).__name__}). Pass `discriminator_peft_config` with existing "
                "module names (e.g. target_modules='all-linear')."
            )
        self.lora = nn.ModuleDict(deltas)
        self._linear4bit_layers = tuple(module for module in backbone.modules() if _is_linear4bit(module))
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=getattr(backbone.config, "initializer_range", 0.02))
        self.score.to(next(backbone.parameters()).device)
        self._depth = 0

    @property
    def backbone_module(self) -> nn.Module:
        return self.backbone if hasattr(self, "backbone") else self._borrowed[0]

    @property
    def peft_policy(self) -> nn.Module | None:
        return self._peft[0] if self._peft else None

    @property
    def target_names(self) -> list[str]:
        return list(self._targets)

    @contextlib.contextmanager
    def session(self):
        """Everything a discriminator pass needs, undone on exit; wrap forward AND backward in it (gradient
        checkpointing recomputes the forward during backward). Re-entrant."""
        if self._depth > 0:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        backbone = self.backbone_module
        owner = self.peft_policy if self.peft_policy is not None else backbone
        requires_grad = [(param, param.requires_grad) for param in owner.parameters()]
        modes = [(module, module.training) for module in backbone.modules()]
        handles = []
        with contextlib.ExitStack() as stack:
            try:
                if self.peft_policy is not None:
                    stack.enter_context(self.peft_policy.disable_adapter())
                for param, _ in requires_grad:
                    param.requires_grad_(False)
                for name, module in self._targets.items():
                    handles.append(module.register_forward_hook(self._delta_hook(self.lora[name.replace(".", "__")])))
                if _checkpointing(backbone):
                    # With the backbone frozen nothing entering a checkpointed layer requires grad, and reentrant
                    # checkpointing would then drop the adapter's gradients (what peft's enable_input_require_grads
                    # fixes for PEFT policies).
                    handles.append(
                        backbone.get_input_embeddings().register_forward_hook(
                            lambda m, i, out: out.requires_grad_(True)
                        )
                    )
                self._depth = 1
                yield
            finally:
                self._depth = 0
                for handle in handles:
                    handle.remove()
        # After peft re-enabled its adapter (which sets requires_grad on its own terms): restore the exact flags.
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training

    @staticmethod
    def _delta_hook(delta: _LoraDelta):
        def hook(module, args, output):
            return output + delta(args[0]).to(output.dtype)

        return hook

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        with self.session():
            backbone = self.backbone_module
            if backbone.training != self.training:
                backbone.train(self.training)  # the session restores every module's mode on exit
            for layer in self._linear4bit_layers:
                # bitsandbytes' CPU path repacks a 4-bit weight, for good, into an inference-only layout the first
                # time the layer runs in eval mode without grad; no gradient flows through it after that, so the
                # policy's LoRA would never train again. The layer's mode changes nothing else: D keeps it in train.
                layer.training = True
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Last token that is not padding, as transformers' sequence classifiers read it.
        if self.pad_token_id is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (positions * (input_ids != self.pad_token_id)).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        return SequenceClassifierOutput(logits=self.score(pooled.to(self.score.weight.dtype)))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys of a peft SEQ_CLS adapter on `AutoModelForSequenceClassification` of the same architecture."""
        prefix = f"base_model.model.{self.backbone_prefix}"
        state = {}
        for name in self._targets:
            delta = self.lora[name.replace(".", "__")]
            state[f"{prefix}.{name}.lora_A.weight"] = delta.lora_A.weight
            state[f"{prefix}.{name}.lora_B.weight"] = delta.lora_B.weight
        state["base_model.model.score.weight"] = self.score.weight
        return {key: value.detach().contiguous().cpu() for key, value in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.adapter_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"The discriminator adapter in {source} does not match this discriminator (same policy architecture, "
                f"`discriminator_type` and LoRA targets needed): missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        prefix = f"base_model.model.{self.backbone_prefix}"
        with torch.no_grad():
            for name in self._targets:
                delta = self.lora[name.replace(".", "__")]
                delta.lora_A.weight.copy_(state[f"{prefix}.{name}.lora_A.weight"])
                delta.lora_B.weight.copy_(state[f"{prefix}.{name}.lora_B.weight"])
            self.score.weight.copy_(state["base_model.model.score.weight"])

    def peft_config(self, base_model_name_or_path: str | None) -> Any:
        from peft import LoraConfig, TaskType

        targets = sorted({name.split(".")[-1] for name in self._targets})
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            target_modules=targets,
            modules_to_save=["score"],
            base_model_name_or_path=base_model_name_or_path,
            **self.lora_settings,
        )


class SharedDiscriminator(Discriminator):
    """[`Discriminator`] whose model is a [`SharedBackboneClassifier`]: same interface, every pass in its session.

    `save_pretrained` writes a peft LoRA adapter for `AutoModelForSequenceClassification` (task SEQ_CLS, the score head
    as a module to save) on `base_model_name_or_path`, and the tokenizer:

        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        model = PeftModel.from_pretrained(model, "output_dir/discriminator")

    With a fully fine-tuned policy the base is the policy as saved alongside (`output_dir`), since the discriminator
    reads the policy's current weights; with a PEFT policy (or a frozen copy) it is the policy's base checkpoint.
    """

    model: SharedBackboneClassifier

    def __init__(self, model: SharedBackboneClassifier, *args, base_model_name_or_path: str | None = None, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.base_model_name_or_path = base_model_name_or_path

    def update(self, *args, **kwargs):
        with self.model.session():
            return super().update(*args, **kwargs)

    def score(self, batches):
        with self.model.session():
            return super().score(batches)

    def save_pretrained(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        # A fully fine-tuned policy is saved in the parent directory (save_model), and that is the base D reads.
        base = self.base_model_name_or_path or os.path.dirname(os.path.abspath(output_dir))
        self.model.peft_config(base).save_pretrained(output_dir)
        save_file(self.model.adapter_state_dict(), os.path.join(output_dir, ADAPTER_WEIGHTS_NAME))
        self.processing_class.save_pretrained(output_dir)

    def load_weights(self, input_dir: str) -> None:
        from safetensors.torch import load_file

        path = os.path.join(input_dir, ADAPTER_WEIGHTS_NAME)
        if not os.path.exists(path):
            raise ValueError(
                f"{input_dir} holds no shared-discriminator adapter ({ADAPTER_WEIGHTS_NAME}): it was written with "
                "another `discriminator_type`. Resume with the `discriminator_type` of the run that wrote it."
            )
        self.model.load_adapter_state_dict(load_file(path), input_dir)


def resolve_discriminator_type(
    requested: str | None, has_instance: bool, has_path: bool, has_tokenizer: bool, sharded: bool
) -> str:
    """`None` means "shared" unless the user gave a separate discriminator (model, path or tokenizer) or the policy is
    sharded (ZeRO-3 / FSDP), where only a separate full copy works; an explicit choice that cannot work raises."""
    if requested is None:
        return "full_copy" if has_instance or has_path or has_tokenizer or sharded else "shared"
    if requested == "full_copy":
        return requested
    candidates = (("`discriminator=` (a model)", has_instance), ("`discriminator_processing_class=`", has_tokenizer))
    given = [name for name, flag in candidates if flag]
    if given:
        raise ValueError(
            f"`discriminator_type={requested!r}` reads the policy's weights and token ids, but {' and '.join(given)} "
            "was passed. Drop it, or set `discriminator_type='full_copy'` to train that separate discriminator."
        )
    if sharded:
        raise ValueError(
            f"`discriminator_type={requested!r}` runs the policy's modules outside its DeepSpeed ZeRO-3 / FSDP "
            "engine, where their weights are sharded. Set `discriminator_type='full_copy'` (a separate discriminator "
            "loaded with full weights on every rank)."
        )
    return requested


def build_shared_discriminator(
    policy: nn.Module,
    kind: str,
    processing_class,
    args,
    lora_config: Any = None,
    base_model_name_or_path: str | None = None,
    device: torch.device | None = None,
) -> SharedDiscriminator:
    """The discriminator of `discriminator_type` "shared" or "frozen_copy" on the unwrapped `policy`.

    `lora_config` (a peft `LoraConfig`: the trainer's `discriminator_peft_config`, else the policy's `peft_config`)
    gives the adapter's rank, alpha, dropout and targets; without one, `discriminator_lora_r` and
    `discriminator_lora_alpha` on every linear layer of the backbone."""
    quantized = getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False)
    if kind == "frozen_copy" and (_is_peft_model(policy) or quantized):
        raise ValueError(
            "`discriminator_type='frozen_copy'` copies a fully fine-tuned policy's weights; this policy uses PEFT, so "
            "its base is frozen already and `discriminator_type='shared'` reads it at no extra memory."
        )
    if processing_class.pad_token_id is None:
        raise ValueError(
            "The policy's tokenizer has no pad token, which the discriminator needs to batch sequences. Set one, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    if lora_config is not None:
        settings = dict(
            r=lora_config.r,
            alpha=lora_config.lora_alpha,
            dropout=lora_config.lora_dropout,
            target_modules=lora_config.target_modules or "all-linear",
        )
    else:
        settings = dict(r=args.discriminator_lora_r, alpha=args.discriminator_lora_alpha)
    copy_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    # Initialising the adapter and head draws random numbers: on a forked RNG, so the policy's stream is unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = SharedBackboneClassifier(
            policy,
            pad_token_id=processing_class.pad_token_id,
            frozen_copy=kind == "frozen_copy",
            copy_dtype=copy_dtype,
            **settings,
        )
    if device is not None:
        model.to(device)
    return SharedDiscriminator(
        model,
        processing_class,
        uses_policy_tokens=True,
        **optimizer_settings(args),
        base_model_name_or_path=None if kind == "shared" and not _is_peft_model(policy) else base_model_name_or_path,
    )
