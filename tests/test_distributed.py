"""UniAPLTrainer on two CPU processes (torchrun, gloo, MULTI_CPU): what DDP must keep in sync stays in sync.

The training script is tests/scripts/distributed_train.py; each rank writes a JSON report that this test compares.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distributed_train.py")
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
NUM_PROCESSES = 2
MAX_STEPS = 3
TIMEOUT_S = 300


def torchrun_command() -> list[str]:
    if shutil.which("torchrun"):
        return ["torchrun"]
    return [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tiny_model_path, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["OMP_NUM_THREADS"] = "1"
    command = torchrun_command() + [
        "--nproc_per_node",
        str(NUM_PROCESSES),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        SCRIPT,
        tiny_model_path,
        str(out_dir),
        str(MAX_STEPS),
    ]
    # Own process group: on a timeout the workers are killed with torchrun instead of being left behind.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}"
    found = []
    for rank in range(NUM_PROCESSES):
        with open(out_dir / f"rank{rank}.json") as f:
            found.append(json.load(f))
    return found


def test_two_processes_ran(reports):
    assert [r["rank"] for r in reports] == list(range(NUM_PROCESSES))
    for report in reports:
        assert report["world_size"] == NUM_PROCESSES
        assert report["distributed_type"].endswith("MULTI_CPU")


def test_policy_and_discriminator_identical_across_ranks(reports):
    first = reports[0]
    assert first["policy_changed"], "the policy did not train"
    assert first["discriminator_changed"], "the discriminator did not train"
    for report in reports[1:]:
        assert report["policy_hash"] == first["policy_hash"], "policy parameters differ across ranks"
        assert report["discriminator_hash"] == first["discriminator_hash"], (
            "discriminator parameters differ across ranks: its gradients were not all-reduced"
        )
        assert report["adversarial_coef"] == first["adversarial_coef"], "λ differs across ranks"


def test_demonstration_mix_on_every_rank(reports):
    # generation batch = 8 rows x 2 ranks = 4 prompts x 4 generations; demonstration_ratio=0.5 -> 2 demonstration
    # prompts per batch, spread so that each rank's slice (2 prompts) holds one of each kind.
    for report in reports:
        assert len(report["batches"]) == MAX_STEPS
        for batch in report["batches"]:
            assert batch["demonstration"] == 4 and batch["preference"] == 4, batch
    # The ranks score different prompts (DDP splits the generation batch); together they cover the whole batch.
    for step in range(MAX_STEPS):
        prompts = [set(report["batches"][step]["prompts"]) for report in reports]
        assert not prompts[0] & prompts[1], f"both ranks scored the same prompts at step {step}"
        assert sum(len(p) for p in prompts) == 4


def test_sft_batches_disjoint_across_ranks(reports):
    """Each rank's SFT term reads its own `sft_per_device_train_batch_size` demonstrations per micro-step, none of them
    on the other rank; an epoch covers every demonstration once; the normaliser is the expert-token count of the
    step over both ranks, divided by their number (DDP averages the gradients)."""
    batch_size, num_demonstrations = reports[0]["sft_batch_size"], reports[0]["num_demonstrations"]
    for report in reports:
        assert len(report["sft_reads"]) == MAX_STEPS  # one micro-step per optimizer step (no accumulation)
        assert all(len(read["experts"]) == batch_size for read in report["sft_reads"])
    epoch = []
    for step in range(MAX_STEPS):
        reads = [report["sft_reads"][step] for report in reports]
        per_rank = [{tuple(expert) for expert in read["experts"]} for read in reads]
        assert all(len(rows) == batch_size for rows in per_rank), "a rank read one demonstration twice"
        assert not per_rank[0] & per_rank[1], f"both ranks read the same demonstration at step {step}"
        tokens = sum(len(expert) for read in reads for expert in read["experts"])
        for read in reads:
            assert read["normalizer"] == pytest.approx(tokens / NUM_PROCESSES)
        if len(epoch) < num_demonstrations:
            epoch += [row for rows in per_rank for row in rows]
    assert len(set(epoch)) == num_demonstrations, "the first epoch did not read every demonstration once"


def test_adversarial_advantages_equal_the_single_process_result(reports):
    """A_adv is computed on the rewards of the whole generation batch (gathered over ranks, in rank order): each rank's
    slice equals what one process computes from the same rewards."""
    import torch

    from trl_uniapl.discriminator import group_relative_advantages

    for step in range(MAX_STEPS):
        rewards = torch.tensor([r for report in reports for r in report["adversarial"][step]["rewards"]])
        advantages = torch.tensor([a for report in reports for a in report["adversarial"][step]["advantages"]])
        assert torch.isfinite(rewards).any() and advantages.abs().max() > 0
        single_process = group_relative_advantages(rewards, reports[0]["num_generations"])
        torch.testing.assert_close(advantages, single_process, rtol=1e-6, atol=1e-7)


def test_metrics_reduced_and_finite(reports):
    histories = [report["log_history"] for report in reports]
    step_logs = [entry for entry in histories[0] if "loss" in entry]
    assert len(step_logs) == MAX_STEPS
    expected = {
        "loss",
        "sft/loss",
        "discriminator/loss",
        "discriminator/acc_real",
        "discriminator/acc_fake",
        "discriminator/js_estimate",
        "discriminator/skipped_updates",
        "adversarial/reward_mean",
        "adversarial/unscored",
        "adversarial/coef",
        "rewards/adversarial/mean",
        "rewards/length_and_mix_reward/mean",
    }
    for entry in step_logs:
        assert expected <= entry.keys(), expected - entry.keys()
        for key in expected:
            assert math.isfinite(entry[key]), (key, entry[key])
        assert entry["discriminator/skipped_updates"] == 0
    # Every logged value (losses, rewards, discriminator statistics) is reduced over ranks, so all ranks log the same.
    for history in histories[1:]:
        assert len(history) == len(histories[0])
        for mine, theirs in zip(histories[0], history):
            assert mine.keys() == theirs.keys()
            for key in mine.keys() - TIMING_KEYS:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
