"""Cost of one discriminator update: one forward/backward over the real and fake rows together (the default) against
one per side (the earlier code), on the task's student with the shared discriminator.

Both run `Discriminator.update` itself; the two-pass variant only skips `Discriminator.regroup`, so the update's
`logits` runs one model call per side, as before the change. The two variants alternate update by update on two
identical discriminators (same weights, same rows; which one goes first alternates too), so a change in machine load
hits both alike; the logits, loss and gradient of the two are equal (`tests/test_adversarial.py`). The batch is one
UniAPL generation batch of the quality benchmark: 2 demonstration prompts, their expert completions (real) and 8
policy completions each (fake, 48 tokens).

    python benchmarks/discriminator_update.py --output_dir benchmarks/results/discriminator_update
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers in benchmarks/
from common import machine, quiet_libraries  # noqa: E402

from trl_uniapl import UniAPLConfig  # noqa: E402
from trl_uniapl.demo import student as student_lib  # noqa: E402
from trl_uniapl.ifeval import task  # noqa: E402
from trl_uniapl.ifeval.rewards import prompt_text  # noqa: E402
from trl_uniapl.shared_discriminator import build_shared_discriminator  # noqa: E402


def rows(tokenizer, num_prompts: int, num_generations: int, completion_length: int, seed: int):
    """Token ids of the real rows (prompt + expert completion) and fake rows (prompt + `completion_length` tokens)."""
    generator = torch.Generator().manual_seed(seed)
    real, fake = [], []
    for row in task.generate_rows(num_prompts, seed=seed, topics=task.TRAIN_TOPICS):
        chat = [{"role": "user", "content": prompt_text(row["prompt"])}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        expert = tokenizer(task.teacher_response(row), add_special_tokens=False)["input_ids"]
        real.append(list(prompt) + expert + [tokenizer.eos_token_id])
        for _ in range(num_generations):
            sample = torch.randint(10, len(tokenizer), (completion_length,), generator=generator).tolist()
            fake.append(list(prompt) + sample)
    return real, fake


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/discriminator_update")
    parser.add_argument("--repetitions", type=int, default=30, help="Timed updates per variant (after 3 warm-ups).")
    parser.add_argument("--num_prompts", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--completion_length", type=int, default=48)
    parser.add_argument("--student_fast", action="store_true", help="The much smaller test student (seconds).")
    args = parser.parse_args(argv)
    quiet_libraries()
    path = student_lib.build_student(fast=args.student_fast, show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = UniAPLConfig(
        output_dir=os.path.join(args.output_dir, "tmp"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=32,
        discriminator_learning_rate=1e-3,
    )
    policy = AutoModelForCausalLM.from_pretrained(path)
    discriminators = {
        "one_pass": build_shared_discriminator(policy, "shared", tokenizer, config),
        "two_passes": build_shared_discriminator(copy.deepcopy(policy), "shared", tokenizer, config),
    }
    discriminators["two_passes"].regroup = lambda batches: batches  # one model call per side, as before
    real, fake = rows(tokenizer, args.num_prompts, args.num_generations, args.completion_length, seed=0)
    real_index = torch.arange(len(real)).repeat_interleave(args.num_generations)
    seconds = {name: [] for name in discriminators}
    names = list(discriminators)
    for repetition in range(3 + args.repetitions):
        for name in names if repetition % 2 == 0 else names[::-1]:  # alternate which goes first
            discriminator = discriminators[name]
            real_batches, fake_batches = discriminator.encode_ids(real), discriminator.encode_ids(fake)
            start = time.perf_counter()
            discriminator.update(real_batches, fake_batches, "bce", 0.0, real_index)
            if repetition >= 3:
                seconds[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds["one_pass"], seconds["two_passes"], strict=True)]
    out = {
        "benchmark": "discriminator_update",
        "command": "python benchmarks/discriminator_update.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "rows": {"real": len(real), "fake": len(fake)},
        "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
        "one_pass_over_two_passes": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "seconds": seconds,
        "machine": machine(),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "discriminator_update.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({key: out[key] for key in ("rows", "median_seconds", "one_pass_over_two_passes")}, indent=1))
    return out


if __name__ == "__main__":
    main()
