"""Train UniAPLTrainer with `expert_in_group=True` (LUFFY) for a few steps on several CPU processes and dump each
rank's generation batches.

Launched by tests/test_luffy.py as

    torchrun --nproc_per_node 2 tests/scripts/luffy_distributed.py MODEL_DIR OUT_DIR MAX_STEPS

6 rows per rank and groups of 4: the middle group of every generation batch spans both ranks, so its expert row (the
group's last) lives on rank 1. Each rank writes OUT_DIR/rank{N}.json with, per generation batch, its rows'
demonstration flags, expert flags, completion ids, expert ids, advantages and task rewards, and its log_history.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402

from trl_uniapl import UniAPLTrainer  # noqa: E402
from trl_uniapl.luffy import EXPERT_MASK_KEY  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared settings
from conftest import length_reward, make_completions, make_prompts, uniapl_args  # noqa: E402


def main(model_path: str, out_dir: str, max_steps: int) -> None:
    preference = Dataset.from_dict({"prompt": make_prompts(16)})
    demonstrations = Dataset.from_dict({"prompt": make_prompts(8, offset=7), "completion": make_completions(8)})
    rewards = []

    def recorded_reward(completions, **kwargs):
        values = length_reward(completions)
        rewards.append(values)
        return values

    args = uniapl_args(
        out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=6,
        num_generations=4,
        demonstration_ratio=0.5,
        expert_in_group=True,
        adversarial_coef=0.1,
    )
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=recorded_reward,
        args=args,
        train_dataset=preference,
        demonstration_dataset=demonstrations,
    )
    batches = []
    generate_and_score = trainer._generate_and_score_completions

    def recorded(inputs):
        output = generate_and_score(inputs)
        batch = trainer._batch
        batches.append(
            {
                "is_demonstration": batch.is_demonstration,
                "expert": output[EXPERT_MASK_KEY].tolist(),
                "completion_ids": [
                    ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])
                ],
                "expert_ids": batch.expert_ids,
                "advantages": output["advantages"].tolist(),
                "rewards": rewards[-1],
                "adversarial_advantages": batch.adversarial_advantages.tolist(),
            }
        )
        return output

    trainer._generate_and_score_completions = recorded
    trainer.train()
    digest = hashlib.sha256()
    for name, param in sorted(trainer.accelerator.unwrap_model(trainer.model).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "batches": batches,
        "policy_hash": digest.hexdigest(),
        "log_history": trainer.state.log_history,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
