"""Checks that need CUDA (skipped on CPU, e.g. in CI here), plus a CPU check of the ZeRO-3 loading guard.

Multi-GPU DeepSpeed/FSDP runs are launched by hand (see docs/distributed.md); these tests cover one GPU.
"""

import math
import weakref

import pytest
import torch
from conftest import length_reward, uniapl_args

from trl_uniapl import UniAPLTrainer
from trl_uniapl.discriminator import outside_zero3_init

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_discriminator_loads_outside_zero3_init():
    """Under ZeRO-3, transformers partitions every `from_pretrained` (zero.Init); the discriminator must not be."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class FakeZero3Config:
        def is_zero3(self):
            return True

    config = FakeZero3Config()
    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = weakref.ref(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with outside_zero3_init():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_train_on_gpu(bf16, tiny_model_path, preference_dataset, demonstration_dataset, tmp_path):
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(tmp_path, use_cpu=False, bf16=bf16),
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    assert trainer.discriminator.device.type == "cuda"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        for key in ("loss", "sft/loss", "discriminator/loss", "adversarial/reward_mean"):
            assert math.isfinite(entry[key]), (key, entry[key])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@requires_cuda
@pytest.mark.gpu
def test_vllm_colocate(tiny_model_path, preference_dataset, demonstration_dataset, tmp_path):
    """GRPO's vLLM colocate generation with UniAPL's extra tensors (importance-sampling keys stay GRPO's)."""
    pytest.importorskip("vllm")
    trainer = UniAPLTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=uniapl_args(
            tmp_path, use_cpu=False, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2, max_steps=2
        ),  # fmt: skip
        train_dataset=preference_dataset,
        demonstration_dataset=demonstration_dataset,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["sft/loss"]) for entry in logs)
