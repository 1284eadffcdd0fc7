"""The two data streams of UniAPL: demonstrations (prompt + expert completion) and preference prompts.

A demonstration is a row with a non-empty `completion`, in TRL's prompt-completion format (standard or
conversational). Demonstrations come either mixed into `train_dataset` or as a separate `demonstration_dataset`;
here both become one map-style dataset (`datasets.concatenate_datasets`) and a sampler that puts a fixed number of
demonstration prompts into every generation batch.
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

STANDARD, CONVERSATIONAL = "standard", "conversational"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _message_format(messages: Any, dataset_name: str, index: int, field: str) -> str:
    """Return the format of a conversational `field`, or raise a ValueError that names the row."""
    where = f"{dataset_name} row {index}, field `{field}`"
    if len(messages) == 0:
        raise ValueError(f"{where} is an empty list of messages. Give at least one {{'role', 'content'}} message.")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{where}: every message must be a dict with 'role' and 'content' keys, got {_describe(message)}."
            )
        if not isinstance(message["content"], (str, list)):
            raise ValueError(
                f"{where}: message content must be a string (or a list of content blocks), got "
                f"{type(message['content']).__name__} {_describe(message['content'])}."
            )
    return CONVERSATIONAL


def field_format(value: Any, dataset_name: str, index: int, field: str) -> str:
    """Format (`"standard"` or `"conversational"`) of a prompt or completion value; raises on anything else."""
    if isinstance(value, str):
        return STANDARD
    if isinstance(value, list):
        return _message_format(value, dataset_name, index, field)
    raise ValueError(
        f"{dataset_name} row {index}, field `{field}`: expected a string (standard format) or a list of "
        f"{{'role', 'content'}} messages (conversational format), got {type(value).__name__} {_describe(value)}."
    )


def _is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, list):
        return all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip() for m in value
        )
    return False


def validate_row(row: dict[str, Any], dataset_name: str, index: int, demonstration: bool) -> str:
    """Check one row and return its format. A demonstration needs a prompt and a non-empty completion."""
    if "prompt" not in row or row["prompt"] is None:
        raise ValueError(
            f"{dataset_name} row {index} has no `prompt`. Every row needs a `prompt` (a string or a list of "
            "messages); demonstrations also need a non-empty `completion`."
        )
    prompt_format = field_format(row["prompt"], dataset_name, index, "prompt")
    if _is_blank(row["prompt"]):
        raise ValueError(
            f"{dataset_name} row {index}, field `prompt` is empty. Give the prompt text or remove the row."
        )
    if not demonstration:
        return prompt_format
    completion = row.get("completion")
    if completion is None:
        raise ValueError(
            f"{dataset_name} row {index} has no `completion`. Demonstration rows need the expert's completion; "
            "prompt-only rows belong in `train_dataset`."
        )
    completion_format = field_format(completion, dataset_name, index, "completion")
    if _is_blank(completion):
        raise ValueError(
            f"{dataset_name} row {index}, field `completion` is empty. A demonstration needs the expert's "
            "non-empty completion; for a prompt without one, set `completion` to None (in `train_dataset`) or drop "
            "the row."
        )
    if completion_format != prompt_format:
        raise ValueError(
            f"{dataset_name} row {index} mixes a {prompt_format} `prompt` with a {completion_format} `completion`. "
            "Use strings for both (standard) or lists of messages for both (conversational)."
        )
    return prompt_format


@dataclass
class Streams:
    """The merged training dataset and where each stream's rows are in it."""

    dataset: Dataset | IterableDataset | None
    preference_indices: list[int]
    demonstration_indices: list[int]
    format: str | None
    separate_demonstrations: bool = False

    @property
    def has_demonstrations(self) -> bool:
        return len(self.demonstration_indices) > 0


def _check_formats(formats: dict[str, set[str]]) -> str | None:
    found = {fmt: name for name, fmts in formats.items() for fmt in fmts}
    if len(found) > 1:
        raise ValueError(
            f"Standard rows (e.g. in {found[STANDARD]}) are mixed with conversational rows (e.g. in "
            f"{found[CONVERSATIONAL]}). All prompts and completions of both streams must use the same format: convert "
            "strings to [{'role': 'user', 'content': ...}] messages or apply the chat template to all of them."
        )
    return next(iter(found), None)


def _first_error_row(formats: list[str], fmt: str) -> int:
    return next(i for i, f in enumerate(formats) if f != fmt)


def _validate_dataset(
    dataset: Dataset, name: str, demonstration_mask: list[bool], require_prompts: bool = True
) -> list[str]:
    """Validate the rows and return the format of every row that has a prompt. Without `require_prompts` (an
    environment supplies the prompts), preference rows are left to GRPOTrainer's own rules, except that a prompt they
    have must be in the demonstrations' format."""
    if "prompt" not in dataset.column_names and (require_prompts or any(demonstration_mask)):
        raise ValueError(
            f"{name} has no `prompt` column (columns: {dataset.column_names}). Rename the prompt column to `prompt`."
        )
    rows_formats, format_rows = [], []
    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [None] * len(dataset)
    completions = dataset["completion"] if "completion" in dataset.column_names else [None] * len(dataset)
    for index, (prompt, completion, is_demo) in enumerate(zip(prompts, completions, demonstration_mask, strict=True)):
        if is_demo or require_prompts:
            row = {"prompt": prompt, "completion": completion}
            rows_formats.append(validate_row(row, name, index, demonstration=is_demo))
        elif isinstance(prompt, (str, list)) and prompt:
            rows_formats.append(field_format(prompt, name, index, "prompt"))
        else:
            continue
        format_rows.append(index)
    if len(set(rows_formats)) > 1:
        position = _first_error_row(rows_formats, rows_formats[0])
        raise ValueError(
            f"{name} row {format_rows[position]} is {rows_formats[position]} but row {format_rows[0]} is "
            f"{rows_formats[0]}. All rows must use the same format (strings, or lists of {{'role', 'content'}} "
            "messages)."
        )
    return rows_formats


def _merge_feature(first: Any, second: Any) -> Any:
    """One feature type for a column of both streams; a type inferred as `null` (a JSON field that is null in every
    row of one file, e.g. an IFEval `kwargs` key no row of that file uses) gives way to the other stream's type."""
    if first == Value("null"):
        return second
    if second == Value("null"):
        return first
    if isinstance(first, dict) and isinstance(second, dict):
        return {
            key: _merge_feature(first[key], second[key])
            if key in first and key in second
            else first.get(key, second.get(key))
            for key in {**first, **second}
        }
    if isinstance(first, List) and isinstance(second, List):
        return List(_merge_feature(first.feature, second.feature), length=first.length)
    return first


def _align_features(first: Dataset, second: Dataset) -> tuple[Dataset, Dataset]:
    """Give both datasets the same columns and feature types, so that they concatenate: a column one of them lacks
    is added as None, and the columns they share get one type."""
    merged = {
        name: _merge_feature(first.features[name], second.features[name])
        if name in second.features
        else first.features[name]
        for name in first.column_names
    }
    merged.update({name: feature for name, feature in second.features.items() if name not in merged})
    features = Features(merged)
    aligned = []
    for dataset in (first, second):
        for name in features:
            if name not in dataset.column_names:
                dataset = dataset.add_column(name, [None] * len(dataset), feature=features[name])
        aligned.append(dataset if dataset.features == features else dataset.cast(features))
    return aligned[0], aligned[1]


def _demonstration_mask(dataset: Dataset) -> list[bool]:
    if "completion" not in dataset.column_names:
        return [False] * len(dataset)
    return [completion is not None for completion in dataset["completion"]]


def merge_streams(
    train_dataset: Dataset | IterableDataset | None,
    demonstration_dataset: Dataset | None,
    demonstrations_in_train_dataset: bool = True,
    require_prompts: bool = True,
) -> Streams:
    """
    Validate the demonstrations and merge both streams into one dataset.

    With `demonstrations_in_train_dataset`, a row of `train_dataset` whose `completion` is not None is a
    demonstration; otherwise (a GRPO script whose dataset merely has a `completion` column, e.g. reference answers
    for a reward function) every row of `train_dataset` is a preference prompt. Every row of `demonstration_dataset`
    is a demonstration. Raises a ValueError naming the dataset, row and field for any malformed row; without
    `require_prompts` (an environment supplies the prompts) only demonstrations need a prompt.
    """
    if isinstance(demonstration_dataset, IterableDataset):
        raise ValueError(
            "`demonstration_dataset` is an IterableDataset; UniAPL needs a map-style `datasets.Dataset` to guarantee "
            "that every generation batch holds demonstrations. Load it without `streaming=True`, or mix the "
            "demonstrations into `train_dataset` as rows with a `completion`."
        )
    if isinstance(train_dataset, IterableDataset) or train_dataset is None:
        if demonstration_dataset is not None:
            raise ValueError(
                "A `demonstration_dataset` needs a map-style `train_dataset` (a `datasets.Dataset`, not an "
                "IterableDataset or None) to be merged with."
            )
        # Streaming rows are validated batch by batch during training.
        return Streams(train_dataset, [], [], None)

    train_mask = (
        _demonstration_mask(train_dataset) if demonstrations_in_train_dataset else [False] * len(train_dataset)
    )
    formats = {"train_dataset": set(_validate_dataset(train_dataset, "train_dataset", train_mask, require_prompts))}
    if demonstration_dataset is None:
        merged = train_dataset
        demonstration_mask = train_mask
    else:
        if "completion" not in demonstration_dataset.column_names:
            raise ValueError(
                f"demonstration_dataset has no `completion` column (columns: {demonstration_dataset.column_names}). "
                "Demonstrations are prompt-completion rows: rename the expert answer column to `completion`."
            )
        formats["demonstration_dataset"] = set(
            _validate_dataset(demonstration_dataset, "demonstration_dataset", [True] * len(demonstration_dataset))
        )
        _check_formats(formats)
        left, right = _align_features(train_dataset, demonstration_dataset)
        merged = concatenate_datasets([left, right])
        demonstration_mask = train_mask + [True] * len(demonstration_dataset)

    fmt = _check_formats(formats)
    demonstration_indices = [i for i, is_demo in enumerate(demonstration_mask) if is_demo]
    preference_indices = [i for i, is_demo in enumerate(demonstration_mask) if not is_demo]
    logger.info(
        "UniAPL streams: %d preference prompts and %d demonstrations (%s format).",
        len(preference_indices),
        len(demonstration_indices),
        fmt,
    )
    return Streams(merged, preference_indices, demonstration_indices, fmt, demonstration_dataset is not None)


def demonstrations_per_batch(streams: Streams, prompts_per_batch: int, demonstration_ratio: float | None) -> int:
    """Number of demonstration prompts in each generation batch of `prompts_per_batch` unique prompts."""
    num_demos, num_prefs = len(streams.demonstration_indices), len(streams.preference_indices)
    if num_demos == 0:
        return 0
    if num_prefs == 0:
        return prompts_per_batch
    if demonstration_ratio is None:
        demonstration_ratio = 0.5 if streams.separate_demonstrations else num_demos / (num_demos + num_prefs)
    count = round(demonstration_ratio * prompts_per_batch)
    if 0.0 < demonstration_ratio < 1.0:
        # Both kinds exist and both were asked for: every generation batch must hold both.
        count = min(max(count, 1), prompts_per_batch - 1)
    return count


class MixedRepeatSampler(Sampler[int]):
    """
    TRL's `RepeatSampler` over two streams: every chunk of `batch_size` unique prompts holds exactly
    `num_demonstrations` demonstration prompts, spread evenly over the chunk so that each process's contiguous slice of
    the generation batch gets its share. Each index is repeated `mini_repeat_count` times in a row (one group of
    generations) and each chunk `repeat_count` times (for `steps_per_generation` and `num_iterations`), exactly as in
    `RepeatSampler`.

    One epoch is one pass over the preference prompts (or over the demonstrations when there are no preference
    prompts); the other stream is cycled, reshuffled at each cycle. The order depends only on `seed` and the epoch
    (`set_epoch`), so a resumed run sees the same rows as an uninterrupted one.
    """

    def __init__(
        self,
        preference_indices: list[int],
        demonstration_indices: list[int],
        num_demonstrations: int,
        mini_repeat_count: int,
        batch_size: int,
        repeat_count: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if not 0 <= num_demonstrations <= batch_size:
            raise ValueError(f"num_demonstrations={num_demonstrations} must be in [0, batch_size={batch_size}].")
        if num_demonstrations > 0 and not demonstration_indices:
            raise ValueError("num_demonstrations > 0 but there are no demonstrations.")
        if num_demonstrations < batch_size and not preference_indices:
            raise ValueError("Preference prompts are requested but there are none.")
        self.preference_indices = list(preference_indices)
        self.demonstration_indices = list(demonstration_indices)
        self.num_demonstrations = num_demonstrations
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        num_preferences = batch_size - num_demonstrations
        if num_preferences > 0:
            self.num_batches = len(self.preference_indices) // num_preferences
        else:
            self.num_batches = len(self.demonstration_indices) // num_demonstrations
        # Where the demonstrations sit in a chunk: evenly spread (Bresenham), e.g. 3 of 8 -> slots 2, 5, 7.
        self.demonstration_slots = [
            (slot + 1) * num_demonstrations // batch_size - slot * num_demonstrations // batch_size == 1
            for slot in range(batch_size)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cycle(self, indices: list[int], generator: torch.Generator):
        while True:
            order = torch.randperm(len(indices), generator=generator).tolist() if self.shuffle else range(len(indices))
            yield from (indices[i] for i in order)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # the next pass differs even if nobody calls set_epoch
        preferences = self._cycle(self.preference_indices, generator) if self.preference_indices else None
        demonstrations = self._cycle(self.demonstration_indices, generator) if self.demonstration_indices else None
        for _ in range(self.num_batches):
            chunk = [next(demonstrations) if is_demo else next(preferences) for is_demo in self.demonstration_slots]
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return self.num_batches * self.batch_size * self.mini_repeat_count * self.repeat_count


class DemonstrationBatches:
    """
    The SFT term's own stream: which demonstrations each micro-step reads, on each process.

    Epoch `e` is a permutation of the demonstrations drawn from `seed + e` (or their order, without `shuffle`); its
    consecutive blocks of `batch_size × num_processes` demonstrations are the micro-steps' global batches, and
    process `r` reads the `r`-th slice of `batch_size` of each block, so no demonstration is on two processes in one
    micro-step.
    The demonstrations left over at the end of an epoch (fewer than a block) wait for the next epoch's permutation;
    with fewer demonstrations than one block, the blocks run on over the epochs' permutations (a warning says so).

    The position is the number of micro-steps read so far, which the trainer derives from its optimizer step: the
    batches depend on nothing else, so a run resumed from a checkpoint reads what the uninterrupted run read, mid-epoch
    included, and every process can compute every other process's batch (the SFT term's exact normaliser needs no
    communication).
    """

    def __init__(
        self, demonstration_indices: list[int], batch_size: int, num_processes: int, seed: int, shuffle: bool = True
    ):
        self.demonstration_indices = list(demonstration_indices)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.seed = seed
        self.shuffle = shuffle
        self.block_size = batch_size * num_processes
        num_demonstrations = len(self.demonstration_indices)
        # With at least one block per epoch, the left-over demonstrations of an epoch wait for the next one, so a block
        # never holds a demonstration twice; with fewer demonstrations than a block, blocks run over the epochs.
        self.blocks_per_epoch = num_demonstrations // self.block_size
        if self.blocks_per_epoch == 0:
            logger.warning(
                "The SFT batch (%d demonstrations per micro-step over all processes) is larger than the %d "
                "demonstrations: each micro-step reads some of them more than once. Lower "
                "`sft_per_device_train_batch_size` to read each at most once per micro-step.",
                self.block_size,
                num_demonstrations,
            )
        self._epoch_order: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                permutation = torch.randperm(len(self.demonstration_indices), generator=generator).tolist()
            else:
                permutation = range(len(self.demonstration_indices))
            self._epoch_order = (epoch, [self.demonstration_indices[i] for i in permutation])
        return self._epoch_order[1]

    def epoch_of(self, micro_step: int) -> int:
        """The epoch (pass over the demonstrations) that micro-step `micro_step` reads from (its first row's)."""
        if self.blocks_per_epoch == 0:
            return micro_step * self.block_size // len(self.demonstration_indices)
        return micro_step // self.blocks_per_epoch

    def indices(self, micro_step: int, process_index: int) -> list[int]:
        """Dataset indices of the demonstrations that `process_index` reads at micro-step `micro_step` (0-based)."""
        if self.blocks_per_epoch == 0:
            num_demonstrations = len(self.demonstration_indices)
            start = micro_step * self.block_size + process_index * self.batch_size
            positions = [divmod(position, num_demonstrations) for position in range(start, start + self.batch_size)]
            return [self._order(epoch)[offset] for epoch, offset in positions]
        epoch, block = divmod(micro_step, self.blocks_per_epoch)
        start = block * self.block_size + process_index * self.batch_size
        return self._order(epoch)[start : start + self.batch_size]


@dataclasses.dataclass
class GenerationBatch:
    """What the hooks of one generation batch hand to each other, for this process's rows.

    Filled in order: `_generate_and_score_completions` (which rows are demonstrations, their expert completions), then
    `_generate` (the prompts' token ids exactly as the policy saw them), then `_calculate_rewards` (the prompts and
    completions the reward functions saw), then the adversarial rewards.
    """

    is_demonstration: list[bool] = dataclasses.field(default_factory=list)
    expert_completions: list[Any] = dataclasses.field(default_factory=list)
    expert_ids: list[list[int] | None] = dataclasses.field(default_factory=list)
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)
    prompts: list[Any] = dataclasses.field(default_factory=list)
    completions: list[Any] = dataclasses.field(default_factory=list)
    completion_ids: list[list[int]] = dataclasses.field(default_factory=list)
    adversarial_rewards: torch.Tensor | None = None  # NaN where a row is not scored
    adversarial_advantages: torch.Tensor | None = None
