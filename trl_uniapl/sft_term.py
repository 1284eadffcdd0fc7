"""The SFT term α(t)·NLL(expert completions): its stream, its batches and their exact normaliser, its loss, metrics.

    L_SFT(step) = α(t) · Σ_{expert tokens of the step, all processes} −log π_θ(token) / (number of those tokens)

The demonstrations a step reads come from one of two sources:

- its own batch (`sft_per_device_train_batch_size` set, the default): every micro-step reads that many demonstrations
  per process from [`~trl_uniapl.streams.DemonstrationBatches`], whatever prompts are rolled out (CHORD's expert
  iterator, as in ms-swift); this is also what the SFT-only warm-up steps (`sft_warmup_steps`) train on;
- the generation batch (`sft_per_device_train_batch_size=None`, the behaviour before that option): the expert
  completions of the demonstration prompts the sampler put into the batch, each once, spread over its optimizer steps.

The prompt is rendered exactly as the policy sees it (TRL's own prompt tokenization), the expert completion as the
policy would produce it (ending with eos), and only completion tokens are labels.
"""

import logging
import math
from typing import Any

import torch
from trl.data_utils import apply_chat_template, is_conversational

from .streams import DemonstrationBatches, GenerationBatch

logger = logging.getLogger(__name__)


class SFTTerm:
    """
    The SFT term of a [`UniAPLTrainer`]: built by the trainer when it has demonstrations, called from its hooks.

    Interface: `prepare_generation_batch` (from `_generate_and_score_completions`), `loss` (from `compute_loss`),
    `in_warmup` (the SFT-only steps), `coef_at` (α(t)), `expert_token_ids` (shared with the adversarial term) and
    `step_demonstrations` (the rows an optimizer step reads, the discriminator's real samples when no demonstration
    prompt is rolled out).
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        args = trainer.args
        self.args = args
        self.batches = None
        if args.sft_per_device_train_batch_size is not None:
            self.batches = DemonstrationBatches(
                trainer._streams.demonstration_indices,
                args.sft_per_device_train_batch_size,
                trainer.accelerator.num_processes,
                seed=args.seed,
                shuffle=trainer.shuffle_dataset,
            )
        # Generation-batch source, per mode: an evaluation between two optimizer steps of one generation batch must
        # not replace its training micro-batches, which TRL keeps buffered (as it buffers the policy's rows).
        self.micro_batches: dict[str, list[dict[str, torch.Tensor]]] = {"train": [], "eval": []}
        self._tokenized: dict[int, tuple[list[int], list[int]]] = {}  # dataset index -> (prompt ids, expert ids)
        self._step_cache: tuple[int, list[list[int]], float] | None = None  # step, rows per micro-step, normaliser
        self._micro_steps_read = 0  # train micro-steps read since this process started (or resumed) training

    # ------------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------------
    def in_warmup(self, step: int) -> bool:
        """Whether optimizer step `step` is one of the first `sft_warmup_steps`: SFT only, nothing else runs."""
        return step < self.trainer.sft_warmup_steps

    def coef_at(self, step: int) -> float:
        """α(t): linear warm-up to `sft_coef`, then constant, linear or cosine decay to `sft_coef_final`."""
        args = self.args
        if args.sft_coef_warmup_steps > 0 and step < args.sft_coef_warmup_steps:
            return args.sft_coef * (step + 1) / args.sft_coef_warmup_steps
        if args.sft_coef_schedule == "constant":
            return args.sft_coef
        decay_steps = max(1, self.trainer.state.max_steps - args.sft_coef_warmup_steps)
        progress = min(1.0, max(0.0, (step - args.sft_coef_warmup_steps) / decay_steps))
        if args.sft_coef_schedule == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return args.sft_coef_final + (args.sft_coef - args.sft_coef_final) * factor

    # ------------------------------------------------------------------------------------------------------------
    # Tokens
    # ------------------------------------------------------------------------------------------------------------
    def expert_token_ids(self, row: dict[str, Any]) -> tuple[list[int], bool]:
        """The expert completion's token ids as the policy would produce them (ending with eos), truncated to
        `max_completion_length`, and whether it was truncated."""
        trainer = self.trainer
        tokenizer = trainer._tokenizer
        if is_conversational(row):
            rendered = apply_chat_template(
                {"prompt": row["prompt"], "completion": row["completion"]},
                tokenizer,
                tools=trainer.tools or None,
                **trainer.chat_template_kwargs,
            )
            ids = tokenizer(rendered["completion"], add_special_tokens=False)["input_ids"]
            # The template may close the turn with text after eos (e.g. "\n"), which the policy never generates.
            eos_positions = [i for i, token in enumerate(ids) if token in trainer.eos_token_ids]
            ids = ids[: eos_positions[-1] + 1] if eos_positions else ids + [tokenizer.eos_token_id]
        else:
            ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        truncated = len(ids) > trainer.max_completion_length
        return ids[: trainer.max_completion_length], truncated

    def tokenize_generation_batch(
        self, inputs: list[dict[str, Any]], is_demonstration: list[bool], mode: str
    ) -> list[list[int] | None]:
        """Expert completion ids of a generation batch's rows (None for preference rows), with the length metrics
        counted once per demonstration (its carrier row), not once per generation."""
        expert_ids, carriers = [], []
        for index, (row, is_demo) in enumerate(zip(inputs, is_demonstration, strict=True)):
            if not is_demo:
                expert_ids.append(None)
                continue
            ids, truncated = self.expert_token_ids(row)
            expert_ids.append(ids)
            if self.trainer._is_carrier(index, len(inputs), mode):
                carriers.append((len(ids), truncated))
        self._log_lengths(carriers, mode)
        return expert_ids

    def _log_lengths(self, lengths_and_truncation: list[tuple[int, bool]], mode: str) -> None:
        trainer = self.trainer
        stats = torch.tensor(
            [
                float(sum(length for length, _ in lengths_and_truncation)),
                float(len(lengths_and_truncation)),
                float(sum(truncated for _, truncated in lengths_and_truncation)),
            ],
            device=trainer.accelerator.device,
        )
        total_length, count, total_truncated = trainer.accelerator.gather(stats).view(-1, 3).sum(0).tolist()
        if count > 0:
            trainer._metrics[mode]["expert/mean_length"].append(total_length / count)
            trainer._metrics[mode]["expert/truncated_ratio"].append(total_truncated / count)
        if total_truncated and trainer.accelerator.is_main_process:
            logger.warning(
                "%d of the %d demonstrations in this batch are longer than max_completion_length=%d tokens and were "
                "truncated for the SFT term and the discriminator.",
                int(total_truncated),
                int(count),
                trainer.max_completion_length,
            )

    def _tokenized_demonstration(self, index: int) -> tuple[list[int], list[int]]:
        """(prompt ids, expert ids) of dataset row `index`, tokenized once."""
        if index not in self._tokenized:
            row = self.trainer._streams.dataset[index]
            prompt_ids = self.trainer._tokenize_prompts([row["prompt"]])[0][0]
            self._tokenized[index] = (list(prompt_ids), self.expert_token_ids(row)[0])
        return self._tokenized[index]

    # ------------------------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------------------------
    def _micro_step_index(self, step: int, micro_step_in_window: int) -> int:
        return step * self.args.gradient_accumulation_steps + micro_step_in_window

    def step_demonstrations(self, step: int) -> list[tuple[list[int], list[int], int]]:
        """(prompt ids, expert ids, dataset index) of every demonstration this process reads at optimizer step
        `step`, from the SFT term's own batch."""
        accumulation = self.args.gradient_accumulation_steps
        process = self.trainer.accelerator.process_index
        rows = []
        for micro_step in range(accumulation):
            for index in self.batches.indices(self._micro_step_index(step, micro_step), process):
                rows.append((*self._tokenized_demonstration(index), index))
        return rows

    def _own_micro_batch(self) -> dict[str, torch.Tensor]:
        """This process's next micro-step of its own SFT batch, normalised by its optimizer step's expert tokens over
        all processes (computed locally: every process knows every process's batch)."""
        trainer, args = self.trainer, self.args
        step = trainer.state.global_step
        accumulation = args.gradient_accumulation_steps
        micro_step_in_window = self._micro_steps_read % accumulation
        self._micro_steps_read += 1
        if self._step_cache is None or self._step_cache[0] != step:
            rows_per_micro_step, tokens = [], 0
            for micro_step in range(accumulation):
                index = self._micro_step_index(step, micro_step)
                for process in range(trainer.accelerator.num_processes):
                    rows = self.batches.indices(index, process)
                    tokens += sum(len(self._tokenized_demonstration(row)[1]) for row in rows)
                    if process == trainer.accelerator.process_index:
                        rows_per_micro_step.append(rows)
            self._step_cache = (step, rows_per_micro_step, float(max(tokens, 1)))
            epoch = self.batches.epoch_of(self._micro_step_index(step, 0))
            trainer._metrics["train"]["sft/epoch"].append(float(epoch))
        _, rows_per_micro_step, tokens = self._step_cache
        rows = rows_per_micro_step[micro_step_in_window]
        micro_batch = self._tensors([self._tokenized_demonstration(row) for row in rows])
        # DDP averages gradients over processes, hence the division by their number.
        micro_batch["normalizer"] = torch.tensor(tokens / trainer.accelerator.num_processes)
        return micro_batch

    def prepare_generation_batch(self, batch: GenerationBatch, mode: str) -> None:
        """With the generation batch as the source (and in evaluation), split its demonstrations over the micro-steps.

        TRL splits a generation batch into `steps_per_generation` micro-steps, `gradient_accumulation_steps` of which
        make one optimizer step. Each demonstration (its carrier row) goes to one optimizer step, round robin, so
        every step carries its share; when this process has fewer demonstrations than steps, they are reused so that
        no step goes without. A step's normaliser is the number of expert tokens it carries over all processes. In
        evaluation, one micro-step.
        """
        if mode == "train" and self.batches is not None:
            return
        trainer = self.trainer
        carriers = [
            row
            for row, ids in enumerate(batch.expert_ids)
            if ids is not None and trainer._is_carrier(row, len(batch.expert_ids), mode)
        ]
        micro_steps = self.args.steps_per_generation if mode == "train" else 1
        window = self.args.gradient_accumulation_steps if mode == "train" else 1
        num_steps = micro_steps // window
        rows_per_micro_step: list[list[int]] = [[] for _ in range(micro_steps)]
        for position, row in enumerate(carriers):
            step = position % num_steps
            rows_per_micro_step[step * window + (position // num_steps) % window].append(row)
        for step in range(len(carriers), num_steps if carriers else 0):
            rows_per_micro_step[step * window].append(carriers[step % len(carriers)])

        micro_batches = [
            self._tensors([(batch.prompt_ids[row], batch.expert_ids[row]) for row in rows])
            for rows in rows_per_micro_step
        ]
        local_tokens = torch.tensor(
            [float((micro_batch["labels"] != -100).sum()) for micro_batch in micro_batches],
            device=trainer.accelerator.device,
        )
        tokens = trainer.accelerator.gather(local_tokens.reshape(1, -1)).sum(0)
        tokens_per_step = tokens.view(num_steps, window).sum(1).repeat_interleave(window)
        for micro_batch, step_tokens in zip(micro_batches, tokens_per_step, strict=True):
            micro_batch["normalizer"] = step_tokens.clamp(min=1.0) / trainer.accelerator.num_processes
        self.micro_batches[mode] = micro_batches

    def _tensors(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded prompt + expert completion rows, labels on the completion tokens only."""
        pad_token_id = self.trainer._tokenizer.pad_token_id
        width = max([len(prompt) + len(expert) for prompt, expert in sequences], default=1)
        input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        for position, (prompt, expert) in enumerate(sequences):
            input_ids[position, : len(prompt) + len(expert)] = torch.tensor(prompt + expert, dtype=torch.long)
            attention_mask[position, : len(prompt) + len(expert)] = 1
            labels[position, len(prompt) : len(prompt) + len(expert)] = torch.tensor(expert, dtype=torch.long)
        device = self.trainer.accelerator.device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "labels": labels.to(device),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, mode: str, coef: float) -> torch.Tensor:
        """`coef` × this micro-step's summed expert NLL / its optimizer step's expert-token count (all processes)."""
        trainer = self.trainer
        if mode == "train" and self.batches is not None:
            micro_batch = self._own_micro_batch()
        else:
            micro_step = trainer._step % self.args.steps_per_generation if mode == "train" else 0
            micro_batch = self.micro_batches[mode][micro_step]
        trainer._metrics[mode]["sft/coef"].append(coef)
        return coef * self._nll(model, micro_batch, mode)

    def _nll(self, model: torch.nn.Module, micro_batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
        """Summed NLL of the micro-batch's expert completion tokens, divided by its normaliser.

        Runs on every process at every micro-step, with a one-token dummy row when the micro-step holds no
        demonstration, so DeepSpeed ZeRO-3 and FSDP see the same forward passes on every process."""
        trainer = self.trainer
        input_ids, attention_mask, labels = (
            micro_batch["input_ids"],
            micro_batch["attention_mask"],
            micro_batch["labels"],
        )
        if input_ids.shape[0] == 0:
            input_ids = torch.full((1, 1), trainer._tokenizer.pad_token_id, dtype=torch.long, device=labels.device)
            attention_mask, labels = torch.ones_like(input_ids), torch.full_like(input_ids, -100)
        # TRL's fused LM head (patched onto the policy by GRPOTrainer): the same temperature-scaled log-probs as the
        # GRPO term's, without materialising the (rows × tokens × vocabulary) logits.
        with trainer.accelerator.autocast():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        token_mask = labels[:, 1:] != -100
        token_logps = outputs.log_probs.float()
        nll_sum = -(token_logps * token_mask).sum()
        stats = torch.stack([nll_sum.detach(), token_mask.sum().float()])
        total_nll, total_tokens = trainer.accelerator.gather(stats.reshape(1, 2)).sum(0).tolist()
        if total_tokens > 0:
            trainer._metrics[mode]["sft/loss"].append(total_nll / total_tokens)
            trainer._metrics[mode]["expert/logp"].append(-total_nll / total_tokens)
        return nll_sum / micro_batch["normalizer"].to(nll_sum.device)
