"""The `trl-uniapl` command (also `python -m trl_uniapl`): `train`, `demo` and `evaluate`.

Every subcommand is parsed by TRL's [`~trl.TrlParser`], so flags and YAML configs (`--config file.yaml`) work as in
`trl grpo`:

    trl-uniapl demo                                   # the embedded task, end to end, on CPU, in minutes
    trl-uniapl train --model_name_or_path Qwen/Qwen3-0.6B --dataset_name prefs.jsonl \
        --demonstration_dataset_name demos.jsonl --reward_funcs ifeval_dense --output_dir out
    accelerate launch --config_file <trl>/accelerate_configs/multi_gpu.yaml -m trl_uniapl train --config run.yaml
    trl-uniapl evaluate --model_name_or_path out --output_json metrics.json
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .data import EXPECTED_ERRORS, file_not_found


def _command(module: str, function: str) -> Callable[[Sequence[str] | None], Any]:
    """A subcommand imported when it runs, after `main` has silenced the known noise of the libraries it imports."""

    def command(argv: Sequence[str] | None) -> Any:
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), function)(argv)

    return command


COMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], Any], str]] = {
    "train": (
        _command("train", "train_main"),
        "Train with UniAPL (UniAPLConfig + ModelConfig + dataset and reward arguments).",
    ),
    "demo": (
        _command("demo", "demo_main"),
        "Run the embedded instruction-following task end to end on CPU, with plots and a report.",
    ),
    "evaluate": (
        _command("evaluate", "evaluate_main"),
        "IFEval metrics of a model on a dataset (default: the embedded held-out split).",
    ),
}


def usage() -> str:
    lines = [
        "usage: trl-uniapl {train,demo,evaluate} [options] [--verbose]  (each takes --help and --config file.yaml)"
    ]
    lines += [""] + [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "  --verbose  show the full traceback of an error and every library warning"]
    return "\n".join(lines)


# Known harmless messages that every command used to print, matched exactly (logger name, message start) so that any
# other warning still shows.
KNOWN_NOISE_LOGS = (
    # bitsandbytes on a CPU with AVX512-BF16 tries to fetch an optional Hub kernel and falls back to its own.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # ... and, offline, the `kernels` package (0.19) says first that it cannot check that kernel's publisher.
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
    # Offline the IFEval checkers split sentences with lm-eval's regex splitter; tested, documented in docs/guide.md.
    ("trl_uniapl.ifeval.rewards", "NLTK 'punkt_tab' data is not installed"),
)
KNOWN_NOISE_WARNINGS = (
    # transformers 5 renamed the option TRL's configs still set; nothing for a user to change.
    r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated and will be removed in v6",
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_noise() -> None:
    """Hide the known harmless warnings of [`KNOWN_NOISE_LOGS`] and [`KNOWN_NOISE_WARNINGS`] (only those)."""
    for logger_name, prefix in KNOWN_NOISE_LOGS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    for message in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


_NEGATIVE_EXPONENT = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """Write `--option -1e-3` as `--option=-1e-3`: argparse takes a negative number in exponent notation for an
    option name and fails with "expected one argument" (plain `-0.001` already works)."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_EXPONENT.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one `trl-uniapl` command and return its result (the trainer of `train`, the metrics of `evaluate` and
    `demo`); errors propagate. [`main`] is the console script's wrapper that turns this into an exit status."""
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"trl-uniapl: error: unknown command {command!r}", file=sys.stderr)
        raise SystemExit(2)
    if "--config" in rest:
        index = rest.index("--config")
        config = rest[index + 1] if index + 1 < len(rest) else None
        if config is None or not os.path.isfile(config):
            raise file_not_found(config or "(none given)", "the --config YAML file")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return COMMANDS[command][0](rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trl-uniapl` console script and of `python -m trl_uniapl`; returns the exit status.

    0 on success. An expected input error ([`EXPECTED_ERRORS`]: bad data, a missing file, an unknown reward, ...)
    prints its message alone to stderr and returns 1; `--verbose` adds the traceback and shows the warnings that are
    otherwise hidden. Unexpected errors propagate with their traceback; argparse's errors exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [token for token in argv if token != "--verbose"]
    if not verbose:
        silence_known_noise()
    try:
        run(argv)
    except EXPECTED_ERRORS as error:
        if verbose:
            traceback.print_exc()
        else:
            print(f"trl-uniapl: error: {error}", file=sys.stderr)
            print("(run again with --verbose for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trl-uniapl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
