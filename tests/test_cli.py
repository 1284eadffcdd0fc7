"""The `trl-uniapl` command: train on local files, evaluate, demo, --help, and the clear errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_uniapl import cli
from trl_uniapl.ifeval.task import make_splits


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
        "--reward_funcs", "ifeval_dense", "trl_uniapl.ifeval.rewards.ifeval_strict_reward",
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
    trainer = cli.run(train_argv(tiny_model_path, task_files, tmp_path / "out"))
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
    trainer = cli.run(argv)
    assert trainer.state.global_step == 2
    assert os.path.exists(tmp_path / "out" / "adapter_config.json")
    assert trainer.discriminator is None


def test_missing_model_path(task_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*no-such-model"):
        cli.run(train_argv(str(tmp_path / "no-such-model"), task_files, tmp_path / "out"))


def test_dataset_without_needed_columns(tiny_model_path, task_files, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "Write about rivers."}\n{"prompt": "Write about cats."}\n')
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    argv[argv.index("--dataset_name") + 1] = str(bare)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['instruction_id_list', 'kwargs'\]"):
        cli.run(argv)
    demos = tmp_path / "demos.jsonl"
    make_splits(num_demonstrations=2, num_preference=1, num_eval=1)["demonstrations"].remove_columns(
        "completion"
    ).to_json(str(demos))
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    argv[argv.index("--demonstration_dataset_name") + 1] = str(demos)
    with pytest.raises(ValueError, match=r"demonstration dataset .* lacks the column\(s\) \['completion'\]"):
        cli.run(argv)


@pytest.mark.parametrize("name", ["ifeval_nonsense", "no_such_module.reward", "trl_uniapl.ifeval.rewards.nope"])
def test_unknown_reward(tiny_model_path, task_files, tmp_path, name):
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    start = argv.index("--reward_funcs")
    argv[start + 1 : start + 3] = [name]
    with pytest.raises(ValueError, match="Unknown reward function"):
        cli.run(argv)


def test_reward_names_resolve():
    from trl_uniapl.ifeval import rewards

    assert cli.resolve_reward_func("ifeval_dense") is rewards.ifeval_dense_reward
    assert cli.resolve_reward_func("ifeval_loose_reward") is rewards.ifeval_loose_reward
    assert cli.resolve_reward_func("trl_uniapl.ifeval.rewards.ifeval_strict_reward") is rewards.ifeval_strict_reward


def test_evaluate(tiny_model_path, task_files, tmp_path, capsys):
    output = tmp_path / "metrics.json"
    argv = ["evaluate", "--model_name_or_path", tiny_model_path, "--dataset_name", task_files["eval"]]
    results = cli.run(argv + ["--max_new_tokens", "8", "--output_json", str(output), "--no_progress"])
    assert 0.0 <= results["prompt_level_strict_acc"] <= 1.0
    saved = json.loads(output.read_text())
    assert saved["inst_level_loose_acc"] == results["inst_level_loose_acc"]
    assert "mean_expert_logprob" in saved
    assert "prompt-level strict acc" in capsys.readouterr().out


def test_evaluate_embedded_split(tiny_model_path):
    argv = ["evaluate", "--model_name_or_path", tiny_model_path, "--num_rows", "2", "--max_new_tokens", "4"]
    results = cli.run(argv + ["--no_progress"])
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
            cli.run([command, "--help"])
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
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["frobnicate"])
    assert exit_info.value.code == 2


def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_UNIAPL_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "demo"
    outcome = cli.run(["demo", "--quick", "--max_steps", "2", "--output_dir", str(output), "--no_progress"])
    for name in ("report.md", "metrics.json", "training_curves.png", "distributions.png", "model/config.json"):
        assert (output / name).exists(), name
    assert outcome["max_steps"] == 2
    assert "prompt_level_strict_acc" in outcome["before"] and "prompt_level_strict_acc" in outcome["after"]
    assert "| prompt-level strict acc |" in (output / "report.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# The installed console script, as a newcomer runs it (issue 14)
# --------------------------------------------------------------------------------------------------------------------
SCRIPT = Path(sys.executable).with_name("trl-uniapl")
NOISE = ("is deprecated and will be removed in v6", "punkt_tab", "kernels-community", "Traceback")


def run_script(*args, cwd, timeout=600, **env):
    """`trl-uniapl ARGS` as a subprocess of the installed console script, offline; returns (result, seconds)."""
    assert SCRIPT.exists(), f"the console script is not installed next to {sys.executable}"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    start = time.monotonic()
    result = subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - start


@pytest.fixture
def student_cache(tmp_path):
    return os.environ.get("TRL_UNIAPL_TEST_CACHE", str(tmp_path / "cache"))


def test_script_readme_first_command_quick_exits_0(tmp_path, student_cache):
    # The README's first command, `trl-uniapl demo`, in its --quick form, from a fresh folder.
    result, _ = run_script("demo", "--quick", "--no_progress", cwd=tmp_path, TRL_UNIAPL_CACHE=student_cache)
    assert result.returncode == 0, result.stderr
    for name in ("report.md", "metrics.json", "training_curves.png", "distributions.png", "model/config.json"):
        assert (tmp_path / "uniapl-demo" / name).exists(), name
    assert "'before':" not in result.stderr  # the results dict is no longer printed as an exit message
    # A short line per tenth of the run instead of transformers' whole log dict per log.
    assert "{'loss'" not in result.stdout and "'rewards/" not in result.stdout, result.stdout
    assert "step 4/4: reward" in result.stdout, result.stdout
    assert not [noise for noise in NOISE if noise in result.stderr], result.stderr


def test_script_train_and_evaluate_exit_0_on_cpu_without_flags(tiny_model_path, task_files, tmp_path):
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    for flag in ("--use_cpu", "--bf16", "False"):  # CPU detection replaces them
        argv.remove(flag)
    result, _ = run_script(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Model saved to" in result.stdout
    assert result.stderr.count("trl-uniapl: no CUDA GPU found: training on the CPU in fp32.") == 1
    assert "object at 0x" not in result.stderr
    assert not [noise for noise in NOISE if noise in result.stderr], result.stderr

    metrics = tmp_path / "m.json"
    argv = ["evaluate", "--model_name_or_path", str(tmp_path / "out"), "--dataset_name", task_files["eval"]]
    result, _ = run_script(
        *argv, "--max_new_tokens", "4", "--no_progress", "--output_json", str(metrics), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "prompt-level strict acc" in result.stdout
    assert len(result.stderr) < 2000, result.stderr  # no per-row results dump
    assert json.loads(metrics.read_text())["model"] == str(tmp_path / "out")


@pytest.mark.parametrize("name", ["prefs_nope.jsonl", "data/demos_nope.jsonl"])
def test_script_missing_local_file_fails_at_once(tiny_model_path, tmp_path, name):
    # The same command failing at argument parsing: the time of the imports alone, on this machine, under its load.
    _, startup_seconds = run_script("train", "--no_such_flag", "1", cwd=tmp_path)
    result, seconds = run_script(
        "train", "--model_name_or_path", tiny_model_path, "--dataset_name", name, "--output_dir", "out", cwd=tmp_path
    )
    assert result.returncode == 1
    assert f"trl-uniapl: error: file not found: {name}" in result.stderr
    assert f"current directory {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr and "Hub" not in result.stderr
    assert seconds < 2 * startup_seconds + 20, (seconds, startup_seconds)  # the Hub retries took ~60 s more


def test_script_bad_flag_fails_with_the_message_alone(tmp_path):
    result, _ = run_script("train", "--no_such_flag", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("trl-uniapl: error: ") and "['--no_such_flag', '1']" in result.stderr
    assert len(result.stderr.splitlines()) <= 3, result.stderr


@pytest.mark.parametrize(
    "name, looks_local",
    [
        ("prefs_nope.jsonl", True),
        ("data/demos_nope.jsonl", True),
        ("./x", True),
        ("a/b/c", True),
        ("google/IFEval", False),
        ("Qwen/Qwen2.5-0.5B", False),
        ("gpt2", False),
    ],
)
def test_looks_like_local_path(name, looks_local):
    assert cli.looks_like_local_path(name) is looks_local


def test_missing_local_paths_never_reach_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset was called: this would wait for the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "uniapl-demo").mkdir()
    start = time.monotonic()
    for name in ("prefs_nope.jsonl", "data/demos_nope.jsonl"):
        with pytest.raises(FileNotFoundError, match=f"file not found: {name} .*current directory {tmp_path}"):
            cli.load_any_dataset(name)
    # a mistyped model folder without ./: its first component is a local folder, so it is no Hub id
    with pytest.raises(FileNotFoundError, match="file not found: uniapl-demo/modle"):
        cli.check_model_path("uniapl-demo/modle")
    assert time.monotonic() - start < 5


def test_hub_model_fails_fast_with_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(cli.UserError, match="HF_HUB_OFFLINE is set. Use the student"):
        cli.check_model_path("someorg/not-a-cached-model", hint="Use the student")
    assert time.monotonic() - start < 5

    import huggingface_hub

    def unreachable(self, *args, **kwargs):
        assert kwargs.get("timeout"), "the Hub probe must have a short timeout"
        raise ConnectionError("Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(cli.UserError, match=r"the Hub cannot be reached \(ConnectionError: .*\)\. Use the student"):
        cli.check_model_path("someorg/not-a-cached-model", hint="Use the student")


def test_expected_errors_print_the_message_alone(tiny_model_path, task_files, tmp_path, capsys):
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    start = argv.index("--reward_funcs")
    argv[start + 1 : start + 3] = ["no_such_reward"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("trl-uniapl: error: Unknown reward function 'no_such_reward'")
    assert "Traceback" not in err and "--verbose" in err
    assert cli.main([*argv, "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_negative_exponent_value_reaches_the_config(tiny_model_path, task_files, tmp_path, capsys):
    assert cli.join_negative_values(["--a", "-1e-3", "--b=-2", "-3e2"]) == ["--a=-1e-3", "--b=-2", "-3e2"]
    argv = [*train_argv(tiny_model_path, task_files, tmp_path / "out"), "--discriminator_learning_rate", "-1e-3"]
    assert cli.main(argv) == 1  # rejected by UniAPLConfig, not by argparse ("expected one argument", status 2)
    assert "`discriminator_learning_rate` must be > 0, got -0.001" in capsys.readouterr().err


def test_known_noise_is_silenced_narrowly():
    import logging
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.silence_known_noise()
        warnings.warn(
            "`gradient_checkpointing` is deprecated and will be removed in v6. Use ...", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("`something_else` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated and will be removed in v6."]
    for logger_name, prefix in cli.KNOWN_NOISE_LOGS:
        logger = logging.getLogger(logger_name)
        assert not all(f.filter(logging.makeLogRecord({"msg": prefix + " ..."})) for f in logger.filters)
        assert all(f.filter(logging.makeLogRecord({"msg": "another warning"})) for f in logger.filters)


def test_help_lists_uniapl_and_dataset_options_first(capsys):
    with pytest.raises(SystemExit):
        cli.run(["train", "--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: trl-uniapl train [--config run.yaml] [options]")
    titles = [line for line in lines if line and not line.startswith(" ")][1:]
    assert [t.split(" ")[0] for t in titles] == ["datasets", "UniAPL", "model,", "GRPO", "training"], titles
    position = {name: text.index(f"  --{name} ") for name in ("dataset_name", "sft_coef", "use_peft", "beta")}
    assert position["dataset_name"] < position["sft_coef"] < position["use_peft"] < position["beta"]
    assert position["sft_coef"] < text.index("  --learning_rate ")
    assert text.index("  --sft_coef ") < len("\n".join(lines[:120]))


def test_rows_are_named_by_file_and_line(tiny_model_path, task_files, tmp_path):
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "Write about rivers.", "completion": "Rivers."}\n{"prompt": "", "completion": "x"}\n')
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out", "--adversarial_coef", "0")
    argv[argv.index("--demonstration_dataset_name") + 1] = str(bad)
    start = argv.index("--reward_funcs")
    argv[start + 1 : start + 3] = ["conftest.length_reward"]
    with pytest.raises(cli.UserError, match=f"^{bad}, line 2, field `prompt` is empty"):
        cli.run(argv)


def test_custom_reward_gets_no_ifeval_hint(tiny_model_path, task_files, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"text": "Write about rivers."}\n')
    argv = train_argv(tiny_model_path, task_files, tmp_path / "out")
    argv[argv.index("--dataset_name") + 1] = str(bare)
    start = argv.index("--reward_funcs")
    argv[start + 1 : start + 3] = ["conftest.length_reward"]
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]") as error:
        cli.run(argv)
    assert "IFEval" not in str(error.value)


def test_parse_resume():
    assert cli.parse_resume("true") is True and cli.parse_resume("True") is True
    assert cli.parse_resume("false") is None and cli.parse_resume(None) is None
    assert cli.parse_resume("out/checkpoint-4") == "out/checkpoint-4"


def test_resume_true_and_damaged_checkpoint(tiny_model_path, task_files, tmp_path, monkeypatch):
    from trl_uniapl.trainer import UniAPLTrainer

    output = tmp_path / "out"
    argv = train_argv(tiny_model_path, task_files, output)
    argv[argv.index("--save_strategy") + 1] = "steps"
    argv += ["--save_steps", "1"]
    cli.run(argv)
    assert (output / "checkpoint-2").is_dir()
    resumed_from = []
    train = UniAPLTrainer.train

    def recording_train(self, resume_from_checkpoint=None, *args, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return train(self, resume_from_checkpoint, *args, **kwargs)

    monkeypatch.setattr(UniAPLTrainer, "train", recording_train)
    cli.run([*argv, "--resume_from_checkpoint", "true"])  # was "Can't find a valid checkpoint at true"
    assert resumed_from == [str(output / "checkpoint-2")]
    monkeypatch.undo()

    newest = max(int(path.name.split("-")[1]) for path in output.glob("checkpoint-*"))
    (output / f"checkpoint-{newest}" / "model.safetensors").write_bytes(os.urandom(4096))
    result, _ = run_script(*argv, "--resume_from_checkpoint", "true", cwd=tmp_path)
    assert result.returncode == 1
    assert f"checkpoint file {output}/checkpoint-{newest}/model.safetensors is damaged" in result.stderr
    assert f"--resume_from_checkpoint {output}/checkpoint-{newest - 1}" in result.stderr
    assert "Traceback" not in result.stderr

    from trl_uniapl.checkpoints import CheckpointError, check_checkpoint_files

    discriminator_file = next((output / "checkpoint-1" / "discriminator").rglob("*.safetensors"))
    discriminator_file.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=f"{discriminator_file} is damaged.*no earlier complete checkpoint"):
        check_checkpoint_files(str(output / "checkpoint-1"))


@pytest.mark.parametrize("method", ["sft_then_agrpo", "luffy", "fixed_ref"])
def test_demo_runs_each_method(tmp_path, method):
    from trl_uniapl.cli.demo import DemoArguments, run_demo

    outcome = run_demo(DemoArguments(output_dir=str(tmp_path / "demo"), quick=True, method=method, no_progress=True))
    assert outcome["method"] == method
    logs = [entry for entry in json.loads((tmp_path / "demo" / "log_history.json").read_text()) if "loss" in entry]
    if method == "sft_then_agrpo":  # SFT only for the first half: no reward, then GRPO
        assert "reward" not in logs[0] and "reward" in logs[-1]
    elif method == "luffy":
        assert all("luffy/expert_advantage" in entry for entry in logs)
    else:
        assert all("reference/score_mean" in entry for entry in logs)
