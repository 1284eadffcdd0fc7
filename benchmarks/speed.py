"""Cost benchmark: one UniAPLTrainer step against one GRPOTrainer step (and against a GRPO step plus an SFT step).

Same student, batch, seed and data in one process; every completion is forced to exactly `completion_length` tokens
(`generation_kwargs={"min_new_tokens": L}` with `max_completion_length=L`), so the ratio measures the algorithm's
overhead and not one policy being more verbose. The trainers run interleaved step by step: each repetition builds a
fresh trainer of every kind (same seed, so the same batches), runs each `train()` in its own thread, and a baton lets
exactly one optimizer step run at a time, in turn (grpo 1, uniapl 1, sft 1, uniapl_no_disc 1, grpo 2, ...), so a
change in machine load hits every trainer alike. The first step of every run (lazy initialisation) and the last (it
overlaps the other threads' end of training) are dropped. The step-time ratio pairs UniAPL's k-th step with GRPO's
k-th step (adjacent in time).

Timings come from wrappers installed on the trainer instances from the outside (trainer.py is untouched):

- `generation`: `_generate` (the sampling call);
- `task_reward`: the IFEval reward function;
- `discriminator_update` / `discriminator_scoring`: `Discriminator.update` / `Discriminator.score` (both run inside
  `AdversarialTerm.advantages`), `adversarial_other`: the rest of it (encoding, A_adv, bookkeeping);
- `policy_loss_forward`: GRPO's `_compute_loss` (forward of the policy-gradient loss);
- `sft_forward`: UniAPL's `SFTTerm._nll` (forward of the expert NLL);
- `backward_and_rest`: `training_step` minus generation, rewards and the two forwards (mostly the one backward of
  both terms, plus GRPO's batch bookkeeping and UniAPL's expert tokenization);
- `optimizer_and_other`: the step's wall time minus everything above (optimizer step, clipping, scheduling, logging).

Memory on CPU: torch allocates tensors outside Python's allocator, so `tracemalloc` misses them; `ru_maxrss` is a
process-wide high-water mark that cannot separate interleaved trainers (and a child process inherits its parent's
through fork + exec). So each trainer's memory is measured in a fresh process of its own (`--memory_probe KIND`, same
settings), by a thread sampling the RSS every 2 ms: `trainer_peak_mb` = peak RSS while building and training the
trainer minus the RSS after imports and data (model, discriminator, optimizer state, generation and activations).
The memory ratio compares these. `static_mb` is the exact size of the trained state for reference: parameters +
gradients + AdamW's two moments (4 x 4 bytes per fp32 parameter) of the policy, plus the discriminator's for UniAPL.
The in-process per-step RSS rise (`step_peak_rss_mb`) is also recorded but is unreliable on CPU: glibc reuses pages
freed by the previous trainer. On CUDA, `torch.cuda.max_memory_allocated` per step is reported instead.

    python benchmarks/speed.py                      # default setting (student, 16 completions of 48 tokens)
    python benchmarks/speed.py --smallest           # seconds; what the test suite runs

GPU mode (`--gpu`): a Qwen3-0.6B-shaped model built locally (full 151,936-token vocabulary, random weights, no
download), GRPO / UniAPL / UniAPL without discriminator, in bf16 full fine-tuning and in QLoRA (NF4 + LoRA r=16 on all
linear layers); 4 prompts x 8 generations, every completion forced to 128 tokens, medians of steps 2-5, one process per
(setting, trainer) so `torch.cuda.max_memory_allocated` is that trainer's alone. Writes gpu.json and gpu.md.

    python benchmarks/speed.py --gpu --output_dir benchmarks/results/speed_gpu          # about 6 min on one H200
    python benchmarks/speed.py --gpu --shape tiny --output_dir /tmp/gpu_tiny            # CPU pipeline check (test)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers in benchmarks/
from common import apply_overrides, machine, quiet_libraries  # noqa: E402

from trl_uniapl.demo import student as student_lib  # noqa: E402
from trl_uniapl.ifeval import task  # noqa: E402
from trl_uniapl.ifeval.rewards import ifeval_dense_reward  # noqa: E402

KINDS = ("grpo", "uniapl", "sft", "uniapl_no_disc")
DEFAULT = {
    "per_device_train_batch_size": 16,
    "num_generations": 4,
    "completion_length": 48,
    "steps": 11,
    "repetitions": 3,
    "learning_rate": 1e-4,
}
SMALLEST = {**DEFAULT, "per_device_train_batch_size": 8, "completion_length": 8, "steps": 4, "repetitions": 1}
PARTS = ("generation", "task_reward", "discriminator_update", "discriminator_scoring", "adversarial_other",
         "policy_loss_forward", "sft_forward", "backward_and_rest", "optimizer_and_other")  # fmt: skip


class Timers:
    """Accumulated seconds per key; `wrap` replaces a bound method on an instance with a timed version."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, key: str):
        timed = _timed_function(getattr(owner, name), self, key)
        setattr(owner, name, timed)
        return timed


class RSSSampler:
    """Peak resident set size (bytes) above the value at `start()`, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.process, self.interval = psutil.Process(), interval
        self._stop = threading.Event()
        self.base = self.peak = 0

    def start(self):
        self.base = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.base


class Baton:
    """Lets the trainers (one thread each) run their optimizer steps in turn: A1 B1 C1 A2 B2 C2 ..."""

    def __init__(self, names: list[str]):
        self.order, self.current = list(names), names[0]
        self.condition = threading.Condition()

    def _next(self, name: str) -> str:
        return self.order[(self.order.index(name) + 1) % len(self.order)]

    def acquire(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.current == name)

    def release(self, name: str) -> None:
        with self.condition:
            self.current = self._next(name)
            self.condition.notify_all()

    def remove(self, name: str) -> None:
        with self.condition:
            if name in self.order:
                if self.current == name and len(self.order) > 1:
                    self.current = self._next(name)
                self.order.remove(name)
            self.condition.notify_all()


class StepRecorder(TrainerCallback):
    """Wall time, part times and peak memory of every optimizer step; waits for its turn before each step."""

    def __init__(self, timers: Timers, name: str, baton: Baton | None = None):
        self.timers, self.sampler, self.steps = timers, RSSSampler(), []
        self.name, self.baton = name, baton or Baton([name])

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.remove(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        self.baton.acquire(self.name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._parts = dict(self.timers.seconds)
        self.sampler.start()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start
        peak = self.sampler.stop()
        parts = {key: value - self._parts.get(key, 0.0) for key, value in self.timers.seconds.items()}
        record = {"step": state.global_step, "seconds": seconds, "parts": parts, "step_peak_rss_mb": peak / 2**20}
        if torch.cuda.is_available():
            record["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.steps.append(record)
        self.baton.release(self.name)


def _state_mb(model) -> float:
    """Parameters + gradients + AdamW moments of the trainable parameters, in MiB (fp32 or the parameters' dtype)."""
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            total += 4 * param.numel() * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total / 2**20


def instrument(trainer, kind: str, timers: Timers) -> None:
    """Install timers on one trainer instance (generation, rewards, discriminator, losses, training_step)."""
    if kind == "sft":
        timers.wrap(trainer, "training_step", "training_step")
        timers.wrap(trainer, "compute_loss", "sft_forward")
        return
    timers.wrap(trainer, "_generate", "generation")
    timers.wrap(trainer, "training_step", "training_step")
    timers.wrap(trainer, "_compute_loss", "policy_loss_forward")
    if getattr(trainer, "sft", None) is not None:
        timers.wrap(trainer.sft, "_nll", "sft_forward")
    trainer.reward_funcs[0] = _timed_function(trainer.reward_funcs[0], timers, "task_reward")
    if getattr(trainer, "discriminator", None) is not None:
        timers.wrap(trainer.discriminator, "update", "discriminator_update")
        timers.wrap(trainer.discriminator, "score", "discriminator_scoring")
        # Everything the adversarial advantage costs (D update, scoring, encoding, A_adv): `adversarial_other` is the
        # part outside the update and scoring passes.
        timers.wrap(trainer.adversarial, "advantages", "adversarial_total")


def _timed_function(function, timers: Timers, key: str):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timers.seconds[key] += time.perf_counter() - start

    return timed


def build_trainer(kind, model_path, tokenizer, splits, settings, seed, output_dir):
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from trl_uniapl import UniAPLConfig, UniAPLTrainer

    length = settings["completion_length"]
    common = dict(output_dir=output_dir, use_cpu=not torch.cuda.is_available(), bf16=False,
                  gradient_checkpointing=False, report_to="none", max_steps=settings["steps"],
                  learning_rate=settings["learning_rate"], logging_steps=1, save_strategy="no", seed=seed,
                  disable_tqdm=True)  # fmt: skip
    grpo = dict(per_device_train_batch_size=settings["per_device_train_batch_size"],
                num_generations=settings["num_generations"], max_completion_length=length,
                generation_kwargs={"min_new_tokens": length}, temperature=1.0, beta=0.0)  # fmt: skip
    # The demonstrations UniAPL's SFT term reads per step (its own batch, `sft_per_device_train_batch_size`): the SFT
    # trainer compared with it reads as many.
    demonstrations_per_step = UniAPLConfig.__dataclass_fields__["sft_per_device_train_batch_size"].default
    if kind == "grpo":
        prompts = concatenate_datasets(
            [
                splits["preference"],
                splits["demonstrations"].remove_columns("completion").cast(splits["preference"].features),
            ]
        )
        trainer = GRPOTrainer(model=model_path, reward_funcs=[ifeval_dense_reward], args=GRPOConfig(**common, **grpo),
                              train_dataset=prompts, processing_class=tokenizer)  # fmt: skip
    elif kind in ("uniapl", "uniapl_no_disc"):
        extra = {"adversarial_coef": 0.0} if kind == "uniapl_no_disc" else dict(settings.get("uniapl_config") or {})
        extra = {"sft_warmup_steps": 0, "sft_coef": 1.0, **extra}  # the one-stage step (the default is staged)
        trainer = UniAPLTrainer(
            model=model_path,
            reward_funcs=[ifeval_dense_reward],
            args=UniAPLConfig(**common, **grpo, **extra),
            train_dataset=splits["preference"],
            demonstration_dataset=splits["demonstrations"],
            processing_class=tokenizer,
        )
    elif kind == "sft":
        args = SFTConfig(**common, per_device_train_batch_size=demonstrations_per_step, completion_only_loss=True)
        trainer = SFTTrainer(model=model_path, args=args,
                             train_dataset=splits["demonstrations"].select_columns(["prompt", "completion"]),
                             processing_class=tokenizer)  # fmt: skip
    else:
        raise ValueError(f"Unknown kind {kind!r}; choose from {KINDS}.")
    trainer.remove_callback(PrinterCallback)
    return trainer, demonstrations_per_step


def memory_probe(kind, model_path, tokenizer, splits, settings, args) -> dict[str, float]:
    """Run in a fresh process: the peak RSS this trainer adds (build + train) over the RSS after imports and data.

    RSS is sampled every 2 ms by a thread (`ru_maxrss` cannot be used: on Linux a child inherits its parent's
    high-water mark through fork + exec, so every probe would report the parent's peak)."""
    gc.collect()
    sampler = RSSSampler()
    sampler.start()
    trainer, _ = build_trainer(kind, model_path, tokenizer, splits, settings, args.seed,
                               os.path.join(args.output_dir, "tmp", f"memory-{kind}"))  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    added = sampler.stop()
    result = {"baseline_mb": sampler.base / 2**20, "peak_mb": sampler.peak / 2**20, "trainer_peak_mb": added / 2**20}
    print("MEMORY_PROBE " + json.dumps(result), flush=True)
    return result


def run_memory_probe(kind: str, argv: list[str] | None) -> dict[str, float]:
    """ru_maxrss is a per-process high-water mark, so each trainer's peak is measured in a process of its own."""
    argv = list(argv if argv is not None else sys.argv[1:])
    command = [sys.executable, os.path.abspath(__file__), *argv, "--memory_probe", kind]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("MEMORY_PROBE "))
    return json.loads(line[len("MEMORY_PROBE ") :])


def _train_in_turn(trainer, kind: str, baton: Baton, errors: list) -> None:
    try:
        trainer.train()
    except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
        errors.append(error)
        baton.remove(kind)


def _breakdown(record: dict[str, Any]) -> dict[str, float]:
    parts = defaultdict(float, record["parts"])
    out = {key: parts[key] for key in ("generation", "task_reward", "discriminator_update", "discriminator_scoring")}
    out["adversarial_other"] = max(
        0.0, parts["adversarial_total"] - parts["discriminator_update"] - parts["discriminator_scoring"]
    )
    out["policy_loss_forward"] = parts["policy_loss_forward"]
    out["sft_forward"] = parts["sft_forward"]
    # Trainer.training_step calls GRPO's _prepare_inputs, so generation and rewards run inside training_step too.
    inside = out["generation"] + out["task_reward"] + parts["adversarial_total"]
    inside += parts["policy_loss_forward"] + parts["sft_forward"]
    out["backward_and_rest"] = max(0.0, parts["training_step"] - inside)
    out["optimizer_and_other"] = max(0.0, record["seconds"] - parts["training_step"])
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_report(report: dict[str, Any], output_dir: str, name: str, table: str) -> dict[str, Any]:
    """Write `name`.json and `name`.md (the table) to `output_dir`, drop the runs' scratch folder, print the table."""
    shutil.rmtree(os.path.join(output_dir, "tmp"), ignore_errors=True)
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smallest", action="store_true", help="Tiny setting with the fast test student (seconds).")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="benchmarks/results/speed")
    parser.add_argument("--student_cache", default=None)
    parser.add_argument("--model", default=None, help="A local model directory instead of the student.")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override a setting.")
    parser.add_argument(
        "--uniapl_config",
        default="{}",
        help="JSON of UniAPLConfig overrides for the uniapl kind (cheap-path studies).",
    )
    parser.add_argument("--memory_probe", default=None, choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--no_memory", action="store_true", help="Skip the per-trainer memory subprocesses.")
    parser.add_argument(
        "--memory_only", action="store_true", help="Only (re)run the memory subprocesses and update speed.json."
    )
    parser.add_argument("--gpu", action="store_true", help="GPU mode: 0.6B-shaped model, bf16 and QLoRA (see above).")
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(GPU_SHAPES), help="Model shape of --gpu.")
    parser.add_argument("--gpu_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu:
        return gpu_main(args, argv)

    settings = dict(SMALLEST if args.smallest else DEFAULT)
    apply_overrides(settings, args.set)
    settings["uniapl_config"] = json.loads(args.uniapl_config)
    if settings["steps"] < 3:
        raise ValueError("steps must be >= 3: the first and last steps of every run are dropped.")

    quiet_libraries()
    os.makedirs(args.output_dir, exist_ok=True)
    wall_start = time.perf_counter()

    model_path = args.model or student_lib.build_student(
        cache_dir=args.student_cache, fast=args.smallest, show_progress=False
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = task.make_splits(seed=0, num_demonstrations=64, num_preference=128, num_eval=1)
    if args.memory_probe:
        return memory_probe(args.memory_probe, model_path, tokenizer, splits, settings, args)
    if args.memory_only:
        return update_memory(args, argv)

    records: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
    static: dict[str, float] = {}
    lengths: dict[str, set] = {kind: set() for kind in args.kinds}
    for repetition in range(settings["repetitions"]):
        order = args.kinds[repetition % len(args.kinds) :] + args.kinds[: repetition % len(args.kinds)]
        baton = Baton(order)
        trainers, recorders, errors = {}, {}, []
        for kind in order:
            timers = Timers()
            trainers[kind], demos = build_trainer(kind, model_path, tokenizer, splits, settings, args.seed,
                                                  os.path.join(args.output_dir, "tmp", kind))  # fmt: skip
            instrument(trainers[kind], kind, timers)
            recorders[kind] = StepRecorder(timers, kind, baton)
            trainers[kind].add_callback(recorders[kind])

        threads = [
            threading.Thread(target=_train_in_turn, args=(trainers[kind], kind, baton, errors)) for kind in order
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for kind, trainer in trainers.items():
            num_parameters = sum(p.numel() for p in trainer.model.parameters())
            static[kind] = _state_mb(trainer.model) + (
                _state_mb(trainer.discriminator.model) if getattr(trainer, "discriminator", None) is not None else 0.0
            )
            for entry in trainer.state.log_history:
                for key in ("completions/min_length", "completions/max_length"):
                    if key in entry:
                        lengths[kind].add(entry[key])
            # First step: lazy initialisation; last step: overlaps the other threads' end of training.
            for record in recorders[kind].steps[1:-1]:
                record["repetition"] = repetition
                records[kind].append(record)
            print(f"[{time.perf_counter() - wall_start:5.0f}s] rep {repetition} {kind:15s} step times "
                  f"{[round(r['seconds'], 3) for r in recorders[kind].steps]}", flush=True)  # fmt: skip
        trainers.clear()

    summary: dict[str, Any] = {}
    for kind, kind_records in records.items():
        summary[kind] = {
            "step_seconds": _stats([r["seconds"] for r in kind_records]),
            "step_peak_rss_mb": _stats([r["step_peak_rss_mb"] for r in kind_records]),
            "static_mb": static[kind],
            "completion_lengths_seen": sorted(lengths[kind]),
        }
        if kind_records and "cuda_peak_mb" in kind_records[0]:
            summary[kind]["cuda_peak_mb"] = _stats([r["cuda_peak_mb"] for r in kind_records])
        if kind != "sft":
            summary[kind]["breakdown_median_seconds"] = {
                part: statistics.median(_breakdown(r)[part] for r in kind_records) for part in PARTS
            }

    probes = {} if args.no_memory else {kind: run_memory_probe(kind, argv) for kind in records}
    for kind, probe in probes.items():
        summary[kind]["memory_probe"] = probe

    def memory(kind):
        if "cuda_peak_mb" in summary[kind]:
            return summary[kind]["cuda_peak_mb"]["median"]
        if kind in probes:
            return probes[kind]["trainer_peak_mb"]
        return summary[kind]["static_mb"] + summary[kind]["step_peak_rss_mb"]["median"]

    ratios: dict[str, Any] = {}
    if "uniapl" in records and "grpo" in records:
        # Step-time ratio per repetition (runs of the same repetition are closest in time), then median/min/max.
        # Steps run in turn (A1 B1 C1 A2 ...): pair UniAPL's k-th step with GRPO's k-th step, adjacent in time.
        pairs = [(u["seconds"], g["seconds"]) for u, g in zip(records["uniapl"], records["grpo"])]
        ratios["uniapl_over_grpo_step_time"] = _stats([u / g for u, g in pairs])
        ratios["uniapl_over_grpo_step_time_of_medians"] = (
            summary["uniapl"]["step_seconds"]["median"] / summary["grpo"]["step_seconds"]["median"]
        )
        # None when the GRPO trainer adds nothing measurable over the baseline (tiny models).
        ratios["uniapl_over_grpo_memory"] = memory("uniapl") / memory("grpo") if memory("grpo") > 0 else None
        ratios["target"] = 1.15
    if {"uniapl", "grpo", "sft"} <= set(records):
        sequential = summary["grpo"]["step_seconds"]["median"] + summary["sft"]["step_seconds"]["median"]
        ratios["uniapl_over_grpo_plus_sft_step_time"] = summary["uniapl"]["step_seconds"]["median"] / sequential
    if "uniapl_no_disc" in records and "grpo" in records:
        ratios["uniapl_no_disc_over_grpo_step_time"] = (
            summary["uniapl_no_disc"]["step_seconds"]["median"] / summary["grpo"]["step_seconds"]["median"]
        )

    report = {
        "benchmark": "speed",
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "demonstrations_per_step": demos,
        "model": model_path,
        "num_parameters": num_parameters,
        "machine": machine(),
        "summary": summary,
        "ratios": ratios,
        "records": records,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    return write_report(report, args.output_dir, "speed", markdown(report))


def update_memory(args, argv) -> dict[str, Any]:
    """Rerun the memory subprocesses for the kinds of an existing speed.json and rewrite its memory numbers."""
    path = os.path.join(args.output_dir, "speed.json")
    with open(path) as f:
        report = json.load(f)
    probe_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--memory_only"]
    for kind in report["summary"]:
        report["summary"][kind]["memory_probe"] = run_memory_probe(kind, probe_argv)
    grpo = report["summary"]["grpo"]["memory_probe"]["trainer_peak_mb"]
    uniapl = report["summary"]["uniapl"]["memory_probe"]["trainer_peak_mb"]
    report["ratios"]["uniapl_over_grpo_memory"] = uniapl / grpo if grpo > 0 else None
    report["memory_command"] = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    shutil.rmtree(os.path.join(args.output_dir, "tmp"), ignore_errors=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(args.output_dir, "speed.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


# ---- GPU mode ------------------------------------------------------------------------------------------------------
GPU_SHAPES = {
    # Qwen3-0.6B's shape (config of Qwen/Qwen3-0.6B), built locally with random weights.
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    # The same code path on CPU in seconds; the vocabulary is still larger than the tokenizer's, as in the real shape.
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}  # fmt: skip
GPU_SETTINGS = {"qwen3-0.6b": dict(prompts=4, num_generations=8, completion_length=128, steps=5),
                "tiny": dict(prompts=2, num_generations=4, completion_length=8, steps=5)}  # fmt: skip
GPU_KINDS = ("grpo", "uniapl", "uniapl_no_disc")
GPU_MODES = ("bf16_full", "qlora")


def build_shaped_model(shape: str, output_dir: str) -> str:
    """Save a randomly initialised Qwen3 of `shape` with the task student's tokenizer (ids past the tokenizer's
    vocabulary decode to nothing; completions are forced to a fixed length, so that changes no measured work)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    from trl_uniapl.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer(student_lib.task_corpus(num_rows=500), vocab_size=2000)
    torch.manual_seed(0)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = Qwen3Config(**GPU_SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True, **special)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def gpu_case(args, model_path: str, mode: str, kind: str) -> dict[str, Any]:
    """One (setting, trainer) in this process: per-step seconds and CUDA peaks of `steps` optimizer steps."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    from trl_uniapl import UniAPLConfig, UniAPLTrainer

    cuda = torch.cuda.is_available()
    settings = GPU_SETTINGS[args.shape]
    length = settings["completion_length"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = task.make_splits(seed=0, num_demonstrations=64, num_preference=128, num_eval=1)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    common = dict(output_dir=os.path.join(args.output_dir, "tmp", f"{mode}-{kind}"), use_cpu=not cuda, bf16=cuda,
                  gradient_checkpointing=True, report_to="none", max_steps=settings["steps"], learning_rate=1e-5,
                  logging_steps=1, save_strategy="no", seed=args.seed, disable_tqdm=True,
                  per_device_train_batch_size=settings["prompts"] * settings["num_generations"],
                  num_generations=settings["num_generations"], max_completion_length=length,
                  generation_kwargs={"min_new_tokens": length}, temperature=1.0, beta=0.0,
                  model_init_kwargs={"dtype": compute_dtype})  # fmt: skip
    extra: dict[str, Any] = {}
    if mode == "qlora":
        extra["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if kind == "grpo":
        prompts = concatenate_datasets(
            [splits["preference"],
             splits["demonstrations"].remove_columns("completion").cast(splits["preference"].features)]
        )  # fmt: skip
        trainer = GRPOTrainer(model=model_path, reward_funcs=[ifeval_dense_reward], args=GRPOConfig(**common),
                              train_dataset=prompts, processing_class=tokenizer, **extra)  # fmt: skip
    else:
        config = {"adversarial_coef": 0.0} if kind == "uniapl_no_disc" else json.loads(args.uniapl_config)
        config = {"sft_warmup_steps": 0, "sft_coef": 1.0, **config}  # the one-stage step (the default is staged)
        trainer = UniAPLTrainer(model=model_path, reward_funcs=[ifeval_dense_reward],
                                args=UniAPLConfig(**common, **config), train_dataset=splits["preference"],
                                demonstration_dataset=splits["demonstrations"], processing_class=tokenizer,
                                **extra)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    timers = Timers()
    instrument(trainer, kind, timers)
    recorder = StepRecorder(timers, kind)
    trainer.add_callback(recorder)
    trainer.train()
    steps = recorder.steps[1:]  # step 1 holds lazy initialisation (CUDA kernels, allocator warm-up)
    lengths = sorted({e[k] for e in trainer.state.log_history for k in ("completions/min_length",
                      "completions/max_length") if k in e})  # fmt: skip
    discriminator = getattr(trainer, "discriminator", None)
    result = {
        "mode": mode,
        "kind": kind,
        "step_seconds": _stats([r["seconds"] for r in steps]),
        "completion_lengths_seen": lengths,
        "trained_state_mb": _state_mb(trainer.model) + (_state_mb(discriminator.model) if discriminator else 0.0),
        "discriminator": type(discriminator.model).__name__ if discriminator else None,
        "breakdown_median_seconds": {part: statistics.median(_breakdown(r)[part] for r in steps) for part in PARTS},
    }
    if cuda:
        result["cuda_step_peak_mb"] = _stats([r["cuda_peak_mb"] for r in steps])
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("GPU_CASE " + json.dumps(result), flush=True)
    return result


def gpu_main(args, argv) -> dict[str, Any]:
    """Every (setting, trainer) in a process of its own, then one table."""
    if args.shape != "tiny" and not torch.cuda.is_available():
        raise ValueError(f"--gpu --shape {args.shape} needs CUDA; use --shape tiny to check the pipeline on CPU.")
    quiet_libraries()
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = build_shaped_model(args.shape, os.path.join(args.output_dir, "tmp", f"model-{args.shape}"))
    if args.gpu_case:
        mode, kind = args.gpu_case.split(":")
        return gpu_case(args, model_path, mode, kind)
    wall_start = time.perf_counter()
    argv = list(argv if argv is not None else sys.argv[1:])
    results = []
    for mode in GPU_MODES:
        for kind in GPU_KINDS:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--gpu_case", f"{mode}:{kind}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{mode}:{kind} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                                   f"{done.stderr[-6000:]}")  # fmt: skip
            line = next(line for line in done.stdout.splitlines() if line.startswith("GPU_CASE "))
            results.append(json.loads(line[len("GPU_CASE ") :]))
            print(f"[{time.perf_counter() - wall_start:5.0f}s] {mode} {kind}: "
                  f"{results[-1]['step_seconds']['median']:.2f} s/step", flush=True)  # fmt: skip
    report = {
        "benchmark": "speed_gpu",
        "command": "python benchmarks/speed.py " + " ".join(argv),
        "shape": {args.shape: GPU_SHAPES[args.shape]},
        "settings": GPU_SETTINGS[args.shape],
        "uniapl_config": json.loads(args.uniapl_config),
        "machine": machine(),
        "results": results,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    return write_report(report, args.output_dir, "gpu", gpu_markdown(report))


def gpu_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Shape {next(iter(report['shape']))}; {settings['prompts']} prompts x {settings['num_generations']} "
        f"generations, every completion {settings['completion_length']} tokens; medians of steps 2-"
        f"{settings['steps']}; device {report['machine'].get('cuda') or 'CPU'}.",
        "",
        "| setting | trainer | step s | x GRPO | peak MiB (max_memory_allocated) | x GRPO | trained state MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in GPU_MODES:
        rows = [r for r in report["results"] if r["mode"] == mode]
        grpo = next(r for r in rows if r["kind"] == "grpo")
        for row in rows:
            seconds = row["step_seconds"]["median"]
            memory = row.get("cuda_step_peak_mb", {}).get("max")
            base = grpo.get("cuda_step_peak_mb", {}).get("max")
            memory_text = f"{memory:.0f} | {memory / base:.2f}" if memory and base else "n/a (CPU) | "
            lines.append(f"| {mode} | {row['kind']} | {seconds:.2f} | {seconds / grpo['step_seconds']['median']:.2f} "
                         f"| {memory_text} | {row['trained_state_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    settings, summary, ratios = report["settings"], report["summary"], report["ratios"]
    lines = [
        f"{settings['per_device_train_batch_size']} completions per step ({settings['num_generations']} per prompt), "
        f"every completion exactly {settings['completion_length']} tokens; {report['demonstrations_per_step']} "
        f"demonstrations per step; {settings['repetitions']} interleaved repetitions x {settings['steps'] - 2} "
        "timed steps.",
        "",
        "| trainer | step s (median) | min | max | static state MiB | trainer peak RSS MiB (own process) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, stats in summary.items():
        step = stats["step_seconds"]
        lines.append(
            f"| {kind} | {step['median']:.3f} | {step['min']:.3f} | {step['max']:.3f} | {stats['static_mb']:.1f} | "
            f"{stats['memory_probe']['trainer_peak_mb'] if 'memory_probe' in stats else float('nan'):.1f} |"
        )
    lines.append("")
    for key, value in ratios.items():
        if value is None:
            lines.append(f"- {key}: not measurable")
        elif isinstance(value, dict):
            lines.append(f"- {key}: median {value['median']:.3f}, min {value['min']:.3f}, max {value['max']:.3f}")
        else:
            lines.append(f"- {key}: {value:.3f}")
    for kind in ("uniapl", "uniapl_no_disc", "grpo"):
        if kind in summary and "breakdown_median_seconds" in summary[kind]:
            parts = summary[kind]["breakdown_median_seconds"]
            total = summary[kind]["step_seconds"]["median"]
            lines += ["", f"Breakdown of a {kind} step (median seconds, share of the median step):", ""]
            lines += ["| part | seconds | share |", "|---|---|---|"]
            for part, seconds in parts.items():
                lines.append(f"| {part} | {seconds:.3f} | {100 * seconds / total:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
