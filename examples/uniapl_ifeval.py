"""UniAPL on instruction following with a real model: LoRA + 4-bit (QLoRA), demonstrations and IFEval rewards.

Single GPU (e.g. Qwen3-0.6B on a 16 GB card):

    python examples/uniapl_ifeval.py --model Qwen/Qwen3-0.6B --max_steps 200

CPU smoke test against the embedded task's local student (no Hub; 4-bit NF4 runs on CPU with bitsandbytes >= 0.50):

    python examples/uniapl_ifeval.py --model student --max_steps 2 --num_eval 8

The data is the embedded IFEval-style task of `trl_uniapl.ifeval.task` (demonstrations written by its programmatic
expert, prompt-only preference rows scored by the IFEval checkers). Swap in your own `prompt` + `completion`
demonstrations and IFEval-format prompts (`prompt`, `instruction_id_list`, `kwargs`, e.g. google/IFEval) for real work.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, BitsAndBytesConfig

from trl_uniapl import UniAPLConfig, UniAPLTrainer
from trl_uniapl.demo.student import build_student
from trl_uniapl.ifeval.evaluation import evaluate_ifeval
from trl_uniapl.ifeval.rewards import ifeval_dense_reward, ifeval_strict_reward
from trl_uniapl.ifeval.task import make_splits

# A student small enough to build in seconds whose layer widths are multiples of bitsandbytes' 4-bit block size (64),
# which its CPU kernels require (the `fast=True` student has width 32).
SMALL_STUDENT = dict(
    hidden_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=400, num_corpus_rows=200,
    num_warmup_examples=64, num_epochs=1, batch_size=16,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B", help="Hub id, local directory, or `student`.")
    parser.add_argument("--output_dir", default="uniapl-qlora", help="Where checkpoints and the adapter go.")
    parser.add_argument("--max_steps", type=int, default=200, help="Optimizer steps.")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="Learning rate of the LoRA weights.")
    parser.add_argument("--batch_size", type=int, default=8, help="per_device_train_batch_size.")
    parser.add_argument("--num_generations", type=int, default=4, help="Completions per prompt (GRPO group).")
    parser.add_argument("--max_completion_length", type=int, default=256, help="Generation budget in training.")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--no_4bit", action="store_true", help="Plain LoRA, no 4-bit quantization.")
    parser.add_argument("--num_eval", type=int, default=100, help="Held-out prompts evaluated before and after.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and of training.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    student = args.model == "student"
    model_path = build_student(**SMALL_STUDENT, show_progress=False) if student else args.model
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    quantization_config = None
    if not args.no_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    splits = make_splits(seed=args.seed)
    eval_rows = splits["eval"].select(range(args.num_eval))
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    config = UniAPLConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,
        model_init_kwargs={"dtype": compute_dtype},
        discriminator_init_kwargs={"dtype": compute_dtype},
        sft_warmup_steps=0,  # one stage: the SFT term from the first step (the default, 0.5, is SFT -> A-GRPO)
        sft_coef=1.0,
        adversarial_coef=0.1,
        discriminator_learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = UniAPLTrainer(
        model=model_path,
        reward_funcs=[ifeval_dense_reward, ifeval_strict_reward],
        args=config,
        train_dataset=splits["preference"],
        demonstration_dataset=splits["demonstrations"],
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )
    budget = 64 if student else 512
    before = evaluate_ifeval(trainer.model, tokenizer, eval_rows, max_new_tokens=budget, batch_size=16)
    trainer.train()
    after = evaluate_ifeval(trainer.model, tokenizer, eval_rows, max_new_tokens=budget, batch_size=16)
    trainer.save_model(args.output_dir)
    keys = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
    summary = {key: {"before": before[key], "after": after[key]} for key in keys}
    print(json.dumps(summary, indent=2))
    with open(os.path.join(args.output_dir, "ifeval_before_after.json"), "w") as file:
        json.dump(summary, file, indent=2)
    return summary


if __name__ == "__main__":
    main()
