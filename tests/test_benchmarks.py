"""End-to-end runs of the two benchmarks in their smallest settings (pipeline and outputs, not the ranking)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("student-cache"))


@pytest.mark.slow
def test_quality_quick_end_to_end(tmp_path, student_cache):
    quality = load("quality")
    output_dir = tmp_path / "quality"
    argv = ["--quick", "--student_fast", "--student_cache", student_cache, "--output_dir", str(output_dir),
            "--set", "steps=2", "num_eval=12", "curve_every=1", "curve_prompts=4", "eval_max_new_tokens=16",
            "max_completion_length=12", "num_demonstrations=16", "num_preference=16"]  # fmt: skip
    report = quality.main(argv)

    for name in ("quality.json", "quality.md", "quality_accuracy.png", "quality_curves.png",
                 "quality_distributions.png"):  # fmt: skip
        assert (output_dir / name).is_file() and (output_dir / name).stat().st_size > 0, name
    saved = json.loads((output_dir / "quality.json").read_text())
    assert saved["settings"]["steps"] == 2 and saved["seeds"] == [0]
    assert {run["method"] for run in saved["runs"]} == set(quality.METHODS)
    for run in saved["runs"]:
        for key in (*quality.METRICS, "topic_accuracy", "unrequested_effect_rate_mean", "expert_logp",
                    "length_wasserstein_to_expert", "mean_response_tokens"):  # fmt: skip
            assert key in run["metrics"], (run["method"], key)
        assert 0.0 <= run["metrics"]["prompt_level_strict_acc"] <= 1.0
        assert run["train_seconds"] > 0 and len(run["history"]) >= 1
    assert set(saved["summary"]) == set(quality.METHODS)
    assert saved["summary"]["uniapl"]["prompt_level_strict_acc"]["n"] == 1
    assert "prompt_level_strict_acc" in saved["constant_reply"] and "prompt_level_strict_acc" in saved["initial"]
    table = (output_dir / "quality.md").read_text()
    assert all(f"| {method} |" in table for method in quality.METHODS) and "constant reply" in table
    assert report["summary"] == saved["summary"]

    # Seeds run in separate processes merge into one report.
    merged = quality.main(["--merge", str(output_dir), str(output_dir), "--output_dir", str(tmp_path / "merged")])
    assert merged["summary"]["uniapl"]["prompt_level_strict_acc"]["n"] == 2
    assert (tmp_path / "merged" / "quality_accuracy.png").is_file()


@pytest.mark.slow
def test_quality_seeds_in_parallel_processes_merge(tmp_path, student_cache):
    quality = load("quality")
    output_dir = tmp_path / "parallel"
    argv = ["--quick", "--student_fast", "--student_cache", student_cache, "--methods", "sft", "--seeds", "0", "1",
            "--jobs", "2", "--output_dir", str(output_dir), "--set", "steps=2", "num_eval=8", "curve_every=0",
            "eval_max_new_tokens=8", "num_demonstrations=16", "num_preference=16"]  # fmt: skip
    report = quality.main(argv)

    assert report["seeds"] == [0, 1] and report["summary"]["sft"]["prompt_level_strict_acc"]["n"] == 2
    assert len(report["merged_from"]) == 2
    for seed in (0, 1):
        part = json.loads((output_dir / f"seed{seed}" / "quality.json").read_text())
        assert part["seeds"] == [seed] and part["settings"]["steps"] == 2
        assert "--jobs" not in part["command"]
    assert json.loads((output_dir / "quality.json").read_text())["seeds"] == [0, 1]


def test_quality_rejects_zero_jobs():
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        load("quality").main(["--quick", "--jobs", "0"])


@pytest.mark.slow
def test_speed_smallest_setting(tmp_path, student_cache):
    speed = load("speed")
    output_dir = tmp_path / "speed"
    argv = ["--smallest", "--student_cache", student_cache, "--output_dir", str(output_dir), "--no_memory"]
    report = speed.main(argv)

    saved = json.loads((output_dir / "speed.json").read_text())
    assert (output_dir / "speed.md").is_file()
    assert set(saved["summary"]) == set(speed.KINDS)
    length = saved["settings"]["completion_length"]
    for kind in ("grpo", "uniapl", "uniapl_no_disc"):
        # Every completion has exactly `completion_length` tokens: the ratio compares equal generation work.
        assert saved["summary"][kind]["completion_lengths_seen"] == [float(length)], kind
        assert set(saved["summary"][kind]["breakdown_median_seconds"]) == set(speed.PARTS)
    breakdown = saved["summary"]["uniapl"]["breakdown_median_seconds"]
    assert breakdown["generation"] > 0 and breakdown["discriminator_update"] > 0
    assert breakdown["discriminator_scoring"] > 0 and breakdown["sft_forward"] > 0
    ratios = saved["ratios"]
    for key in ("uniapl_over_grpo_step_time", "uniapl_over_grpo_memory", "uniapl_over_grpo_plus_sft_step_time"):
        assert key in ratios
    assert ratios["uniapl_over_grpo_step_time"]["median"] > 0
    assert report["ratios"] == saved["ratios"]


@pytest.mark.slow
def test_speed_gpu_mode_pipeline_on_cpu_with_tiny_shape(tmp_path):
    """`--gpu --shape tiny`: the GPU command's whole pipeline (model built locally with a vocabulary larger than the
    tokenizer's, bf16-or-fp32 full fine-tuning and 4-bit QLoRA, one process per case, JSON + markdown) on CPU."""
    speed = load("speed")
    output_dir = tmp_path / "gpu"
    report = speed.main(["--gpu", "--shape", "tiny", "--output_dir", str(output_dir)])

    saved = json.loads((output_dir / "gpu.json").read_text())
    assert saved["results"] == report["results"]
    cases = {(r["mode"], r["kind"]) for r in saved["results"]}
    assert cases == {(mode, kind) for mode in speed.GPU_MODES for kind in speed.GPU_KINDS}
    length = speed.GPU_SETTINGS["tiny"]["completion_length"]
    for result in saved["results"]:
        assert result["completion_lengths_seen"] == [float(length)], result["kind"]
        assert result["step_seconds"]["n"] == speed.GPU_SETTINGS["tiny"]["steps"] - 1  # step 1 dropped
        assert result["step_seconds"]["median"] > 0 and result["trained_state_mb"] > 0
        # The default UniAPL discriminator is the shared one in both settings.
        expected = "SharedBackboneClassifier" if result["kind"] == "uniapl" else None
        assert result["discriminator"] == expected
    table = (output_dir / "gpu.md").read_text()
    assert table.count("| bf16_full |") == 3 and table.count("| qlora |") == 3
    if not speed.torch.cuda.is_available():  # the real shape refuses to run on CPU instead of taking hours
        with pytest.raises(ValueError, match="needs CUDA"):
            speed.main(["--gpu", "--output_dir", str(tmp_path / "no-gpu")])
