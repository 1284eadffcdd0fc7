"""Train UniAPLTrainer for a few steps on several CPU processes and dump what each rank ends up with.

Launched by tests/test_distributed.py as

    torchrun --nproc_per_node 2 tests/scripts/distributed_train.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank{N}.json with hashes of the policy's and the discriminator's parameters, the
demonstration/preference rows it scored in each generation batch, the expert completions its SFT term read in each
micro-step (with their normaliser), and its log_history.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_uniapl import UniAPLTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared settings
from conftest import WORDS, uniapl_args  # noqa: E402


def params_digest(module: torch.nn.Module) -> tuple[str, float]:
    digest = hashlib.sha256()
    total = 0.0
    for name, param in sorted(module.named_parameters()):
        tensor = param.detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
        total += tensor.double().sum().item()
    return digest.hexdigest(), total


SFT_BATCH_SIZE = 2  # 2 per rank: an epoch of the 8 demonstrations is 2 optimizer steps on 2 ranks


def main(model_path: str, out_dir: str, max_steps: int = 3) -> None:
    prompts = [f"Tell me about the {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i) % len(WORDS)]}" for i in range(16)]
    preference = Dataset.from_dict({"prompt": prompts, "source": ["preference"] * len(prompts)})
    demonstrations = Dataset.from_dict(
        {
            "prompt": [f"Describe the {WORDS[(i + 7) % len(WORDS)]} in a few words" for i in range(8)],
            "completion": [f"the {WORDS[(i + 5) % len(WORDS)]} is {WORDS[(i + 2) % len(WORDS)]}" for i in range(8)],
            "source": ["demonstration"] * 8,
        }
    )
    batches = []

    def length_and_mix_reward(prompts, completions, source, **kwargs):
        batches.append(
            {
                "demonstration": source.count("demonstration"),
                "preference": source.count("preference"),
                "prompts": sorted(set(prompts)),
            }
        )
        return [float(len(c)) / 50.0 for c in completions]

    args = uniapl_args(
        out_dir,
        max_steps=max_steps,
        demonstration_ratio=0.5,
        adversarial_coef=0.1,
        adversarial_coef_mode="lagrangian",
        sft_per_device_train_batch_size=SFT_BATCH_SIZE,
    )
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=length_and_mix_reward,
        args=args,
        train_dataset=preference,
        demonstration_dataset=demonstrations,
    )
    adversarial = []  # per generation batch: this rank's r_adv and A_adv
    adversarial_advantages = trainer.adversarial.advantages

    def recorded_adversarial_advantages(mode):
        advantages = adversarial_advantages(mode)
        rewards = trainer._batch.adversarial_rewards
        adversarial.append({"rewards": rewards.tolist(), "advantages": advantages.tolist()})
        return advantages

    trainer.adversarial.advantages = recorded_adversarial_advantages
    sft_reads = []  # per micro-step: the expert token ids this rank's SFT term read, and its normaliser
    own_micro_batch = trainer.sft._own_micro_batch

    def recorded_own_micro_batch():
        micro_batch = own_micro_batch()
        experts = [[token for token in row if token != -100] for row in micro_batch["labels"].tolist()]
        sft_reads.append({"experts": experts, "normalizer": float(micro_batch["normalizer"])})
        return micro_batch

    trainer.sft._own_micro_batch = recorded_own_micro_batch
    discriminator_before, _ = params_digest(trainer.discriminator.model)
    policy_before, _ = params_digest(trainer.accelerator.unwrap_model(trainer.model))
    trainer.train()

    policy_hash, policy_sum = params_digest(trainer.accelerator.unwrap_model(trainer.model))
    discriminator_hash, discriminator_sum = params_digest(trainer.discriminator.model)
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "policy_hash": policy_hash,
        "policy_sum": policy_sum,
        "policy_changed": policy_hash != policy_before,
        "discriminator_hash": discriminator_hash,
        "discriminator_sum": discriminator_sum,
        "discriminator_changed": discriminator_hash != discriminator_before,
        "adversarial_coef": trainer.adversarial.adversarial_coef,
        "batches": batches,
        "adversarial": adversarial,
        "sft_reads": sft_reads,
        "sft_batch_size": SFT_BATCH_SIZE,
        "num_demonstrations": len(demonstrations),
        "num_generations": trainer.num_generations,
        "log_history": trainer.state.log_history,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
