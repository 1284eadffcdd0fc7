"""The `trl-uniapl` command (also `python -m trl_uniapl`), one module per job:

- [`main`]: the entry point: dispatch to a subcommand, exit codes, error messages, known library noise;
- [`train`], [`demo`], [`evaluate`]: the three subcommands, each parsed by TRL's `TrlParser` (flags and `--config`);
- [`data`]: what the command line names, loaded (local files, Hub names, the embedded task, reward functions);
- [`plots`]: the demo's figures.
"""

from .data import (
    EMBEDDED_DATASET,
    REWARD_FUNCS,
    STUDENT_MODEL,
    UserError,
    check_model_path,
    load_any_dataset,
    looks_like_local_path,
    resolve_reward_func,
)
from .demo import DemoArguments, demo_config, find_demo_output, run_demo
from .evaluate import EvaluateArguments, run_evaluate
from .main import KNOWN_NOISE_LOGS, join_negative_values, main, run, silence_known_noise
from .plots import plot_distributions, plot_training_curves
from .train import TrainScriptArguments, make_train_parser, parse_resume, run_training

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
