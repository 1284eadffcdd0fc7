"""The `trl-uniapl` command (also `python -m trl_uniapl`), one module per job:

- [`main`]: the entry point: dispatch to a subcommand, exit codes, error messages, known library noise;
- [`train`], [`demo`], [`evaluate`]: the three subcommands, each parsed by TRL's `TrlParser` (flags and `--config`);
- [`data`]: what the command line names, loaded (local files, Hub names, the embedded task, reward functions);
- [`plots`]: the demo's figures.
"""

import importlib
from typing import Any

# `main` is light (no TRL import): imported here so that `trl_uniapl.cli.main` is the function, as it always was.
from .main import KNOWN_NOISE_LOGS, join_negative_values, main, run, silence_known_noise

_PUBLIC = {
    "DemoArguments": "demo",
    "EMBEDDED_DATASET": "data",
    "EvaluateArguments": "evaluate",
    "REWARD_FUNCS": "data",
    "STUDENT_MODEL": "data",
    "TrainScriptArguments": "train",
    "UserError": "data",
    "check_model_path": "data",
    "demo_config": "demo",
    "find_demo_output": "demo",
    "load_any_dataset": "data",
    "looks_like_local_path": "data",
    "make_train_parser": "train",
    "parse_resume": "train",
    "plot_distributions": "plots",
    "plot_training_curves": "plots",
    "resolve_reward_func": "data",
    "run_demo": "demo",
    "run_evaluate": "evaluate",
    "run_training": "train",
}

__all__ = [
    "EMBEDDED_DATASET",
    "KNOWN_NOISE_LOGS",
    "REWARD_FUNCS",
    "STUDENT_MODEL",
    "DemoArguments",
    "EvaluateArguments",
    "TrainScriptArguments",
    "UserError",
    "check_model_path",
    "demo_config",
    "find_demo_output",
    "join_negative_values",
    "load_any_dataset",
    "looks_like_local_path",
    "main",
    "make_train_parser",
    "parse_resume",
    "plot_distributions",
    "plot_training_curves",
    "resolve_reward_func",
    "run",
    "run_demo",
    "run_evaluate",
    "run_training",
    "silence_known_noise",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: `trl-uniapl` hides a notice that bitsandbytes logs when it is imported (by transformers'
    # trainer utilities), which it can only do before anything imports it.
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
