"""The default discriminator shares the policy's weights: a LoRA adapter + score head, no second model in memory.

What must hold: the policy (parameters, optimizer, random stream, generations) is untouched by the discriminator's
updates, so with λ = 0 in effect a run equals GRPOTrainer's parameter for parameter; the discriminator itself trains,
saves as a loadable peft adapter and reloads exactly.
"""

import pytest
import torch
from conftest import CPU_GRPO_SETTINGS, length_reward, uniapl_args
from conftest import build_uniapl as build
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from trl_uniapl import UniAPLTrainer
from trl_uniapl.shared_discriminator import SharedBackboneClassifier, SharedDiscriminator


def lora(**overrides):
    from peft import LoraConfig

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return LoraConfig(**{**settings, **overrides})


def snapshot(named_parameters) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in named_parameters}


@pytest.mark.parametrize("use_peft", [False, True], ids=["full-fine-tuning", "lora"])
def test_default_discriminator_shares_the_policy_weights(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, use_peft
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset,
                    peft_config=lora() if use_peft else None, max_steps=2)  # fmt: skip
    discriminator = trainer.discriminator
    assert isinstance(discriminator, SharedDiscriminator) and isinstance(discriminator.model, SharedBackboneClassifier)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy_names = {name for name, _ in policy.named_parameters()}
    requires_grad_before = {name: p.requires_grad for name, p in policy.named_parameters()}
    # The discriminator owns only its adapter and head; the policy gained no parameter.
    own = dict(discriminator.model.named_parameters())
    assert own and all(name.startswith(("lora.", "score.")) for name in own)
    assert not {id(p) for p in own.values()} & {id(p) for p in policy.parameters()}
    r = discriminator.model.lora_settings["r"]
    targets = discriminator.model._targets.values()
    adapter_size = sum(r * (m.in_features + m.out_features) for m in targets) + policy.config.hidden_size
    assert sum(p.numel() for p in own.values()) == adapter_size  # LoRA factors + the score head, nothing else
    expected_targets = 2 * 2 if use_peft else 7 * 2  # q,v (the policy's LoRA targets) or all 7 linears, 2 layers
    assert len(discriminator.model.target_names) == expected_targets

    d_before = snapshot(discriminator.model.named_parameters())
    trainer.train()

    assert {name for name, _ in policy.named_parameters()} == policy_names
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == requires_grad_before
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in own.values()}, "the policy optimizer holds discriminator parameters"
    for name, param in discriminator.model.named_parameters():
        assert not torch.equal(param, d_before[name]), f"discriminator parameter {name} did not train"
    # No hook is left on the policy after the discriminator's passes.
    assert all(not module._forward_hooks for module in policy.modules())


@pytest.mark.parametrize("use_peft", [False, True], ids=["full-fine-tuning", "lora"])
def test_lambda_zero_run_equals_grpo_parameter_for_parameter(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, use_peft
):
    """The shared discriminator trains (with LoRA dropout, on its own random stream) but its weight is 0 throughout:
    the policy must end exactly where GRPOTrainer ends on the same prompts."""
    common = {**CPU_GRPO_SETTINGS, "max_steps": 2}

    def make_uniapl():
        return UniAPLTrainer(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=uniapl_args(tmp_path / "uniapl", sft_coef=0.0, discriminator_warmup_steps=100, max_steps=2),
            train_dataset=preference_dataset,
            demonstration_dataset=demonstration_dataset,
            peft_config=lora() if use_peft else None,
            discriminator_peft_config=lora(lora_dropout=0.5, target_modules="all-linear"),
        )

    layout = make_uniapl()  # its merged rows and sampler, for GRPOTrainer
    grpo = GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **common),
        train_dataset=layout.train_dataset,  # the same merged rows; the `completion` column never reaches rewards
        peft_config=lora() if use_peft else None,
    )
    grpo._get_train_sampler = layout._get_train_sampler  # the same prompts in the same order
    grpo.train()
    # Built after GRPO's run, as in test_drop_in_equals_grpo_trainer: each trainer seeds the global RNG when built.
    uniapl = make_uniapl()
    assert uniapl.discriminator.model.lora_settings["lora_dropout"] == 0.5
    d_before = snapshot(uniapl.discriminator.model.named_parameters())
    uniapl.train()

    assert uniapl.adversarial.state["num_updates"] == 2
    assert any(not torch.equal(p, d_before[n]) for n, p in uniapl.discriminator.model.named_parameters())
    assert [e["adversarial/coef"] for e in uniapl.state.log_history if "loss" in e] == [0.0, 0.0]
    grpo_losses = [e["loss"] for e in grpo.state.log_history if "loss" in e]
    assert [e["loss"] for e in uniapl.state.log_history if "loss" in e] == grpo_losses
    grpo_params = dict(grpo.model.named_parameters())
    uniapl_params = dict(uniapl.model.named_parameters())
    assert uniapl_params.keys() == grpo_params.keys()
    moved = 0
    for name, param in uniapl_params.items():
        assert torch.equal(param, grpo_params[name]), name
        moved += param.requires_grad
    assert moved > 0


def _reload_logits(base_path, adapter_dir, batches) -> torch.Tensor:
    from peft import PeftModel

    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return torch.cat([model(**batch).logits[:, 0] for batch in batches])


@pytest.mark.parametrize("use_peft", [False, True], ids=["full-fine-tuning", "lora"])
def test_save_model_writes_a_loadable_adapter_and_head(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, use_peft
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset,
                    peft_config=lora() if use_peft else None, max_steps=1)  # fmt: skip
    trainer.train()
    trainer.save_model()
    discriminator = trainer.discriminator
    saved = tmp_path / "discriminator"
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    AutoTokenizer.from_pretrained(saved)
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12]]
    batches = discriminator.encode_ids(sequences)
    expected = discriminator.score(batches)
    assert not torch.allclose(expected, torch.zeros_like(expected))
    # Full fine-tuning: D reads the trained policy, saved in output_dir; LoRA: the frozen base checkpoint.
    base = tiny_model_path if use_peft else tmp_path
    torch.testing.assert_close(_reload_logits(base, saved, batches), expected, atol=1e-5, rtol=1e-5)

    # The trainer's loader restores the same weights into a fresh discriminator.
    fresh = build(tmp_path / "fresh", tiny_model_path, preference_dataset, demonstration_dataset,
                  peft_config=lora() if use_peft else None, max_steps=1)  # fmt: skip
    fresh.discriminator.load_weights(str(saved))
    for name, param in fresh.discriminator.model.named_parameters():
        assert torch.equal(param, dict(discriminator.model.named_parameters())[name]), name


def test_frozen_copy_keeps_its_own_frozen_backbone(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset
):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset,
                    discriminator_type="frozen_copy", max_steps=2)  # fmt: skip
    model = trainer.discriminator.model
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert model.backbone_module is not policy.model
    frozen = snapshot(model.backbone_module.named_parameters())
    assert not any(p.requires_grad for p in model.backbone_module.parameters())
    trainable = {id(p) for p in trainer.discriminator.trainable_parameters}
    assert trainable == {id(p) for n, p in model.named_parameters() if n.startswith(("lora.", "score."))}
    trainer.train()
    for name, param in model.backbone_module.named_parameters():
        assert torch.equal(param, frozen[name]), f"the frozen copy's {name} moved"
    assert not torch.equal(model.backbone_module.embed_tokens.weight, policy.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("overrides", "trainer_kwargs", "message"),
    [
        ({"discriminator_type": "shared", "discriminator_model_name_or_path": "x"}, {},
         r"`discriminator_type='shared'` reads the policy's own weights.*discriminator_type='full_copy'"),
        ({"discriminator_type": "siamese"}, {}, r"`discriminator_type` must be one of"),
        ({"discriminator_lora_r": 0}, {}, r"`discriminator_lora_r` must be >= 1"),
        ({"discriminator_type": "shared"}, {"discriminator_processing_class": True},
         r"discriminator_processing_class=.*discriminator_type='full_copy'"),
        ({"discriminator_type": "frozen_copy"}, {"peft_config": True}, r"policy uses PEFT.*'shared'"),
        ({}, {"discriminator_peft_config": "nowhere"}, r"matched no linear layer"),
    ],
    ids=["shared-with-path", "unknown-type", "rank-0", "shared-with-tokenizer", "frozen-copy-of-peft", "no-targets"],
)  # fmt: skip
def test_bad_discriminator_settings_fail_clearly(
    tmp_path, tiny_model_path, preference_dataset, demonstration_dataset, overrides, trainer_kwargs, message
):
    with pytest.raises(ValueError, match=message):
        kwargs = {}
        if trainer_kwargs.get("discriminator_processing_class"):
            kwargs["discriminator_processing_class"] = AutoTokenizer.from_pretrained(tiny_model_path)
        if trainer_kwargs.get("peft_config"):
            kwargs["peft_config"] = lora()
        if "discriminator_peft_config" in trainer_kwargs:
            kwargs["discriminator_peft_config"] = lora(target_modules=["nowhere"])
        UniAPLTrainer(
            model=tiny_model_path,
            reward_funcs=length_reward,
            args=uniapl_args(tmp_path, **overrides),
            train_dataset=preference_dataset,
            demonstration_dataset=demonstration_dataset,
            **kwargs,
        )


def test_separate_discriminator_still_available(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset):
    trainer = build(tmp_path, tiny_model_path, preference_dataset, demonstration_dataset,
                    discriminator_type="full_copy", max_steps=1)  # fmt: skip
    assert not isinstance(trainer.discriminator, SharedDiscriminator)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert sum(p.numel() for p in trainer.discriminator.trainable_parameters) >= 0.5 * policy.num_parameters()
    # A path alone (no discriminator_type) also means a separate discriminator, as before this option existed.
    by_path = build(tmp_path / "path", tiny_model_path, preference_dataset, demonstration_dataset,
                    discriminator_model_name_or_path=tiny_model_path, max_steps=1)  # fmt: skip
    assert not isinstance(by_path.discriminator, SharedDiscriminator)


def test_scoring_on_a_4bit_policy_leaves_its_lora_trainable(tiny_model_path):
    """bitsandbytes' CPU path (AVX512-BF16) repacks a 4-bit weight, for good, into an inference-only layout the first
    time the layer runs in eval mode without grad; no gradient reaches the layers below it after that. The
    discriminator's no-grad, eval-mode scoring must not trigger it, or the policy's LoRA never trains again."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=quantization_config)
    policy = get_peft_model(base, lora())
    policy.train()
    discriminator = SharedBackboneClassifier(policy, r=4, alpha=8, pad_token_id=0)
    layers = [module for module in policy.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers
    modes = []
    handles = [layer.register_forward_pre_hook(lambda m, args: modes.append(m.training)) for layer in layers]
    input_ids = torch.randint(1, 200, (2, 9))
    discriminator.eval()
    with torch.no_grad():
        discriminator(input_ids)
    for handle in handles:
        handle.remove()
    assert modes and all(modes), "a 4-bit layer ran in eval mode in the discriminator's no-grad pass"
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert policy.training and all(layer.training for layer in layers)  # the session restored the modes

    policy(input_ids=input_ids, labels=input_ids).loss.backward()
    lora_params = {name: param for name, param in policy.named_parameters() if "lora_" in name}
    assert lora_params and all(param.grad is not None for param in lora_params.values()), [
        name for name, param in lora_params.items() if param.grad is None
    ]
