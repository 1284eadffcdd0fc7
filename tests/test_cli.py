"""The `trl-uniapl` command: train on local files, evaluate, demo, --help, and the clear errors."""

import json
import os
import subprocess
import sys

import pytest

from trl_uniapl import cli
from trl_uniapl.task import make_splits


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """The embedded task's splits written as local jsonl files (small)."""
    splits = make_splits(seed=0, num_demonstrations=8, num_preference=8, num_eval=4)
    root = tmp_path_factory.mktemp("task-files")
    paths = {}
    for name, dataset in splits.items():
        paths[name] = str(root / f"{name}.jsonl")
        dataset.to_json(paths[name])
    return paths


def train_argv(model, task_files, output_dir, *extra):
    return [
        "train",
        "--model_name_or_path", model,
        "--dataset_name", task_files["preference"],
        "--demonstration_dataset_name", task_files["demonstrations"],
        "--reward_funcs", "ifeval_dense", "trl_uniapl.rewards.ifeval_strict_reward",
        "--output_dir", str(output_dir),
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--num_generations", "2",
        "--max_completion_length", "8",
        "--learning_rate", "1e-2",
        "--use_cpu", "--bf16", "False", "--gradient_checkpointing", "False",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        *extra,
    ]  # fmt: skip


def test_train_on_local_jsonl(tiny_model_path, task_files, tmp_path):
    trainer = cli.main(train_argv(tiny_model_path, task_files, tmp_path / "out"))
    assert trainer.state.global_step == 2
    assert os.path.exists(tmp_path / "out" / "config.json")
    keys = set().union(*trainer.state.log_history)
    assert {"sft/loss", "discriminator/acc_real", "rewards/ifeval_dense_reward/mean"} <= keys


def test_train_yaml_config_and_lora(tiny_model_path, task_files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_path}\n"
        f"dataset_name: {task_files['preference']}\n"
        f"demonstration_dataset_name: {task_files['demonstrations']}\n"
        "use_peft: true\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\nadversarial_coef: 0.0\n"
    )
    argv = train_argv("ignored", task_files, tmp_path / "out")
    argv = ["train", "--config", str(config)] + argv[3:]  # drop --model_name_or_path: it comes from the YAML
    trainer = cli.main(argv)
    assert trainer.state.global_step == 2
    assert os.path.exists(tmp_path / "out" / "adapter_config.json")
    assert trainer.discriminator is None


def test_missing_model_path(task_files, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(train_argv(str(tmp_path / "no-such-model"), task_files, tmp_path / "out"))


def test_dataset_without_needed_columns(tiny_model_path, task_files, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "Write about rivers."}\n{"prompt": "Write about cats."}\n')
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    argv[argv.index("--dataset_name") + 1] = str(bare)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['instruction_id_list', 'kwargs'\]"):
        cli.main(argv)
    demos = tmp_path / "demos.jsonl"
    make_splits(num_demonstrations=2, num_preference=1, num_eval=1)["demonstrations"].remove_columns(
        "completion"
    ).to_json(str(demos))
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    argv[argv.index("--demonstration_dataset_name") + 1] = str(demos)
    with pytest.raises(ValueError, match=r"demonstration dataset .* lacks the column\(s\) \['completion'\]"):
        cli.main(argv)


@pytest.mark.parametrize("name", ["ifeval_nonsense", "no_such_module.reward", "trl_uniapl.rewards.nope"])
def test_unknown_reward(tiny_model_path, task_files, tmp_path, name):
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    start = argv.index("--reward_funcs")
    argv[start + 1 : start + 3] = [name]
    with pytest.raises(ValueError, match="Unknown reward function"):
        cli.main(argv)


def test_reward_names_resolve():
    from trl_uniapl import rewards

    assert cli.resolve_reward_func("ifeval_dense") is rewards.ifeval_dense_reward
    assert cli.resolve_reward_func("ifeval_loose_reward") is rewards.ifeval_loose_reward
    assert cli.resolve_reward_func("trl_uniapl.rewards.ifeval_strict_reward") is rewards.ifeval_strict_reward


def test_evaluate(tiny_model_path, task_files, tmp_path, capsys):
    output = tmp_path / "metrics.json"
    argv = ["evaluate", "--model_name_or_path", tiny_model_path, "--dataset_name", task_files["eval"]]
    results = cli.main(argv + ["--max_new_tokens", "8", "--output_json", str(output), "--no_progress"])
    assert 0.0 <= results["prompt_level_strict_acc"] <= 1.0
    saved = json.loads(output.read_text())
    assert saved["inst_level_loose_acc"] == results["inst_level_loose_acc"]
    assert "mean_expert_logprob" in saved
    assert "prompt-level strict acc" in capsys.readouterr().out


def test_evaluate_embedded_split(tiny_model_path):
    argv = ["evaluate", "--model_name_or_path", tiny_model_path, "--num_rows", "2", "--max_new_tokens", "4"]
    results = cli.main(argv + ["--no_progress"])
    assert len(results["responses"]) == 2


def _option_help(parser):
    return {action.dest: action.help for action in parser._actions if action.dest != "help"}


def test_help_lists_every_option_with_text(capsys):
    from trl import ModelConfig, TrlParser

    from trl_uniapl.config import UniAPLConfig

    parsers = {
        "train": (cli.make_train_parser(), (cli.TrainScriptArguments, UniAPLConfig, ModelConfig)),
        "demo": (TrlParser((cli.DemoArguments,)), (cli.DemoArguments,)),
        "evaluate": (TrlParser((cli.EvaluateArguments,)), (cli.EvaluateArguments,)),
    }
    for command, (parser, dataclasses) in parsers.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        helps = _option_help(parser)
        ours = [f for dc in dataclasses for f in dc.__dataclass_fields__ if dc.__module__.startswith("trl_uniapl")]
        for name in ours:
            assert f"--{name}" in text, (command, name)
            assert helps.get(name), f"`{command} --{name}` has no help text"
        for name in helps:
            assert f"--{name}" in text, (command, name)


def test_top_level_usage_and_module_entry():
    result = subprocess.run([sys.executable, "-m", "trl_uniapl", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "demo", "evaluate"):
        assert command in result.stdout
    with pytest.raises(SystemExit, match="unknown command"):
        cli.main(["frobnicate"])


def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_UNIAPL_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "demo"
    outcome = cli.main(["demo", "--quick", "--max_steps", "2", "--output_dir", str(output), "--no_progress"])
    for name in ("report.md", "metrics.json", "training_curves.png", "distributions.png", "model/config.json"):
        assert (output / name).exists(), name
    assert outcome["max_steps"] == 2
    assert "prompt_level_strict_acc" in outcome["before"] and "prompt_level_strict_acc" in outcome["after"]
    assert "| prompt-level strict acc |" in (output / "report.md").read_text()
