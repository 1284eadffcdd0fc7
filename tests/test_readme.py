"""The README's Python snippet runs as written, and its test command is the one CI runs."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    block = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert block, f"no {marker} block in README.md"
    return block.group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_block("readme-snippet"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    # The default, SFT -> A-GRPO: the first half SFT only, then GRPO with the discriminator and no SFT term.
    assert all("sft/loss" in entry and "discriminator/acc_real" not in entry for entry in logs[:2])
    assert all("sft/loss" not in entry and "discriminator/acc_real" in entry for entry in logs[2:])
    assert os.path.isdir(tmp_path / "uniapl-snippet")


def test_ci_runs_the_readme_test_command():
    command = readme_block("ci:test-command")
    assert "pytest" in command and "torch==2.13.0" in command
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test-command" in ci


def test_readme_configuration_table_states_the_config_defaults():
    from trl_uniapl import UniAPLConfig

    config = UniAPLConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(), re.M))
    for name in ("sft_coef", "adversarial_coef", "sft_coef_schedule", "discriminator_warmup_steps"):
        assert rows[name] == str(getattr(config, name)), name


def test_example_configs_state_the_config_defaults_of_alpha_and_lambda():
    import yaml

    from trl_uniapl import UniAPLConfig

    for path in sorted((README.parent / "examples" / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        for name in ("sft_warmup_steps", "sft_coef", "adversarial_coef"):
            assert values[name] == getattr(UniAPLConfig, name), (path.name, name)
