"""End-to-end runs of the two benchmarks in their smallest settings (pipeline and outputs, not the ranking)."""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their sibling modules by name
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("student-cache"))


# ---------------------------------------------------------------------------------------------------------------------
# Quality protocol: splits, grids, selection, resume, bootstrap (no training: a fake run function)
# ---------------------------------------------------------------------------------------------------------------------
def test_validation_split_is_disjoint_from_test_and_training_with_both_held_out_groups():
    protocol = load("quality_protocol")
    from trl_uniapl.ifeval import task

    splits = protocol.make_protocol_splits(0, num_demonstrations=32, num_preference=32, num_validation=150,
                                           num_test=150)  # fmt: skip
    texts = {name: [m[0]["content"] for m in splits[name]["prompt"]] for name in splits}
    for name, prompts in texts.items():
        assert len(set(prompts)) == len(prompts), name
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(texts[a]) & set(texts[b]), (a, b)
    for name in ("validation", "test"):
        assert len(splits[name]) == 150
        assert any(splits[name]["unseen_topic"]) and any(splits[name]["unseen_combination"]), name
        assert not all(splits[name]["unseen_topic"]) and not all(splits[name]["unseen_combination"]), name
    # The test split is the held-out split make_splits has always returned (same seed and sizes), training unchanged.
    plain = task.make_splits(seed=0, num_demonstrations=32, num_preference=32, num_eval=150)
    assert splits["test"]["prompt"] == plain["eval"]["prompt"]
    assert splits["demonstrations"]["prompt"] == plain["demonstrations"]["prompt"]
    assert splits["preference"]["prompt"] == plain["preference"]["prompt"]


def test_scarce_regime_fits_the_prompts_make_splits_can_draw():
    protocol = load("quality_protocol")
    scarce, default = protocol.REGIMES["scarce"], protocol.REGIMES["default"]
    # Fewer demonstrations and more prompts than the default: at most one demonstration per 8 prompts.
    assert scarce["num_demonstrations"] < default["num_demonstrations"] and scarce["num_preference"] >= 1024
    assert scarce["num_preference"] >= 8 * scarce["num_demonstrations"]
    available = protocol.count_training_prompts()
    assert available > scarce["num_demonstrations"] + scarce["num_preference"]


def test_grids_are_the_same_in_every_regime_and_the_one_stage_variants_share_uniapls():
    protocol = load("quality_protocol")
    default = protocol.grids("default")
    assert all(protocol.grids(regime) == default for regime in protocol.REGIMES)
    with pytest.raises(ValueError, match="Unknown regime"):
        protocol.grids("nope")
    # The one-stage variants differ from UniAPL by their adversarial term only; the staged pair by λ only.
    assert default["uniapl_no_disc"] == default["uniapl_fixed_ref"] == default["uniapl"]
    assert default["sft_then_agrpo"] == default["sft_then_grpo"]
    assert set(protocol.CORE_METHODS) <= set(protocol.METHODS)


def test_every_method_gets_a_grid_of_the_same_size_over_its_range_and_the_same_budget():
    protocol, quality = load("quality_protocol"), load("quality")
    grids = protocol.grids()
    assert set(grids) == set(quality.METHODS)
    assert {len(configs) for configs in grids.values()} == {protocol.GRID_SIZE}
    for method, configs in grids.items():
        assert len({protocol.config_id(c) for c in configs}) == len(configs), method
    for method in ("grpo", "luffy", "sft_then_grpo", "sft_then_agrpo"):  # RL learning rates (the RL phase if staged)
        rates = [c["learning_rate"] for c in grids[method]]
        assert 1e-4 <= min(rates) and max(rates) <= 1e-3 and len(set(rates)) > 1, method
    # RL learning rates sit far below SFT's; the two-point grids inside their one-dimensional ranges.
    assert max(protocol.RL_LRS) <= min(protocol.SFT_LRS_2)
    assert min(protocol.SFT_LRS) < min(protocol.SFT_LRS_2) and max(protocol.SFT_LRS_2) < max(protocol.SFT_LRS)
    assert min(protocol.RL_LRS) < min(protocol.RL_LRS_2) and max(protocol.RL_LRS_2) < max(protocol.RL_LRS)
    for method in ("sft_then_grpo", "sft_then_agrpo"):  # one learning rate per phase
        assert len({c["sft_learning_rate"] for c in grids[method]}) > 1, method
    assert len({c["sft_coef"] for c in grids["uniapl"]}) > 1 and len({c["learning_rate"] for c in grids["uniapl"]}) > 1

    for settings in (quality.FULL, quality.QUICK):
        assert settings["num_generations"] == 8
        budgets = {m: quality.budget(m, settings) for m in quality.METHODS}
        assert {b["optimizer_steps"] for b in budgets.values()} == {settings["steps"]}
        # Equal demonstrations per step: every step that reads them reads sft_batch_size.
        steps, per_step = settings["steps"], settings["sft_batch_size"]
        for method in ("sft", "uniapl", "uniapl_no_disc", "uniapl_fixed_ref"):
            assert budgets[method]["demonstrations_seen"] == steps * per_step, method
        for method in ("sft_then_grpo", "sft_then_agrpo"):
            shape = budgets[method]
            assert shape["demonstrations_seen"] == shape["sft_steps"] * per_step, method
            assert shape["samples"] == (steps - shape["sft_steps"]) * settings["per_device_train_batch_size"]
        assert budgets["grpo"]["samples"] == budgets["uniapl"]["samples"]
        assert budgets["uniapl"]["samples"] == steps * settings["per_device_train_batch_size"]
        luffy = budgets["luffy"]
        assert luffy["samples"] + luffy["demonstrations_seen"] == budgets["grpo"]["samples"]


def test_each_uniapl_method_sets_the_options_of_its_definition():
    quality = load("quality")
    settings = {**quality.FULL, "steps": 10}
    options = {m: quality.uniapl_options(m, settings) for m in ("uniapl", "uniapl_no_disc", "sft_then_agrpo", "luffy")}
    assert options["uniapl"]["sft_per_device_train_batch_size"] == settings["sft_batch_size"]
    assert options["uniapl"]["adversarial_coef"] > 0 and options["uniapl"]["sft_coef"] == settings["sft_coef"]
    assert options["uniapl_no_disc"]["adversarial_coef"] == 0.0
    assert options["sft_then_agrpo"]["sft_coef"] == 0.0 and options["sft_then_agrpo"]["adversarial_coef"] > 0
    assert options["sft_then_agrpo"]["sft_warmup_steps"] == 5
    assert options["sft_then_agrpo"]["sft_warmup_learning_rate"] == settings["sft_learning_rate"]
    assert (
        options["luffy"]["expert_in_group"]
        and options["luffy"]["sft_coef"] == options["luffy"]["adversarial_coef"] == 0
    )
    frozen = quality.uniapl_options("uniapl_frozen_disc", {**settings, "discriminator_freeze_after_updates": 16})
    assert frozen["discriminator_freeze_after_updates"] == 16
    if not quality.reference_scorer_available():
        with pytest.raises(RuntimeError, match="reference_scorer"):
            quality.uniapl_options("uniapl_fixed_ref", settings)


def _toy_per_prompt(score: float, num_prompts: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    passed = (rng.random(num_prompts) < score).astype(int).tolist()
    return {"prompt_strict": passed, "inst_followed": [p + 1 for p in passed], "inst_total": [2] * num_prompts,
            "on_topic": [1] * num_prompts, "effects": [[0, -1]] * num_prompts,
            "response_length": [10] * num_prompts, "expert_length": [12] * num_prompts,
            "expert_logp": [-2.0] * num_prompts}  # fmt: skip


class FakeRuns:
    """A stand-in for training: validation scores peak at one grid point, test scores rank the points the other way.

    It fails the test if it is asked for a test run before `selection.json` holds that very configuration.
    """

    def __init__(self, protocol, store, validation_best: dict[str, int], fail_at: int | None = None):
        self.protocol, self.store, self.best, self.fail_at = protocol, store, validation_best, fail_at
        self.calls: list[tuple] = []

    def __call__(self, method, config, seed, split):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("session ended")
        self.calls.append((method, self.protocol.config_id(config), seed, split))
        index = [self.protocol.config_id(c) for c in self.protocol.grids()[method]].index(
            self.protocol.config_id(config)
        )
        if split == "test":
            selection = self.protocol.read_json(self.store.selection_path)
            assert selection[method]["config"] == config, "test run before (or without) the validation selection"
            score = 0.9 - 0.2 * (index == self.best[method])  # the validation winner is the worst on test
        else:
            score = 0.8 if index == self.best[method] else 0.1 + 0.05 * index
        return {"metrics": {"prompt_level_strict_acc": score}, "per_prompt": _toy_per_prompt(score, seed=seed),
                "train_seconds": 1.0, "budget": {"samples": 0}}  # fmt: skip


def test_selection_uses_validation_only_and_precedes_every_test_run(tmp_path):
    protocol = load("quality_protocol")
    grids = protocol.grids()
    best = {method: (i * 3 + 1) % protocol.GRID_SIZE for i, method in enumerate(grids)}
    store = protocol.RunStore(str(tmp_path))
    fake = FakeRuns(protocol, store, best)
    selection = protocol.run_protocol(store, grids, fake, grid_seeds=[0], seeds=[0, 1], log=lambda _: None)

    for method, configs in grids.items():
        assert selection[method]["config"] == configs[best[method]], method
    splits = [call[3] for call in fake.calls]
    assert splits == ["validation"] * (len(grids) * protocol.GRID_SIZE) + ["test"] * (len(grids) * 2)
    # `select` refuses records that were not scored on validation.
    with pytest.raises(ValueError, match="validation"):
        protocol.select({"sft": {protocol.config_id(grids["sft"][0]): [{"split": "test", "metrics": {}}]}},
                        {"sft": grids["sft"][:1]})  # fmt: skip


def test_resume_skips_finished_runs_and_report_marks_pending_cells(tmp_path):
    protocol = load("quality_protocol")
    grids = {m: c for m, c in protocol.grids().items() if m in ("sft", "uniapl")}
    best = {"sft": 0, "uniapl": 2}
    store = protocol.RunStore(str(tmp_path))
    total = sum(len(c) for c in grids.values()) + 2 * len(grids)

    # A session killed during its 6th run: the 5 finished runs are on disk, the report marks what is missing.
    with pytest.raises(KeyboardInterrupt):
        protocol.run_protocol(
            store, grids, FakeRuns(protocol, store, best, fail_at=6), [0], [0, 1], log=lambda _: None
        )
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 5
    partial = protocol.report(store, grids, [0], [0, 1], num_bootstrap=20)
    assert not partial["complete"] and "*pending*" in (tmp_path / "quality.md").read_text()
    assert partial["results"]["uniapl"]["finished_seeds"] == []

    resumed = FakeRuns(protocol, store, best)
    protocol.run_protocol(store, grids, resumed, [0], [0, 1], log=lambda _: None)
    assert len(resumed.calls) == total - 5
    assert resumed.calls[0] == ("uniapl", protocol.config_id(grids["uniapl"][1]), 0, "validation")

    again = FakeRuns(protocol, store, best)
    protocol.run_protocol(store, grids, again, [0], [0, 1], log=lambda _: None)
    assert again.calls == []
    os.remove(store.test_path("sft", 1))
    again = FakeRuns(protocol, store, best)
    protocol.run_protocol(store, grids, again, [0], [0, 1], log=lambda _: None)
    assert again.calls == [("sft", protocol.config_id(grids["sft"][0]), 1, "test")]

    full = protocol.report(store, grids, [0], [0, 1], num_bootstrap=20)
    assert full["complete"] and "*pending*" not in (tmp_path / "quality.md").read_text()
    assert full["results"]["sft"]["paired_seeds"] == [0, 1]
    # Runs made with other settings are never mixed into a folder.
    store.check_settings({"steps": 10})
    with pytest.raises(ValueError, match="other settings"):
        store.check_settings({"steps": 20})


def test_a_run_of_some_methods_adds_to_the_recorded_selection(tmp_path):
    # The scarce regime ran its core methods first, then `--methods luffy`: the second run must not drop the first
    # one's selections.
    protocol = load("quality_protocol")
    grids = protocol.grids()
    store = protocol.RunStore(str(tmp_path))
    first = {m: grids[m] for m in ("sft", "uniapl")}
    protocol.run_protocol(store, first, FakeRuns(protocol, store, {"sft": 2, "uniapl": 1}), [0], [0],
                          phase="grid", log=lambda _: None)  # fmt: skip
    second = {"luffy": grids["luffy"]}
    protocol.run_protocol(store, second, FakeRuns(protocol, store, {"luffy": 3}), [0], [0], log=lambda _: None)
    recorded = protocol.read_json(store.selection_path)
    assert sorted(recorded) == ["luffy", "sft", "uniapl"]
    assert recorded["sft"]["config"] == grids["sft"][2] and recorded["luffy"]["config"] == grids["luffy"][3]
    # A method run again is selected anew, from its own grid runs: its best point, retrained, now scores 0.2 and the
    # last point (0.25) wins.
    os.remove(store.grid_path("sft", grids["sft"][2], 0))
    protocol.run_protocol(store, {"sft": grids["sft"]}, FakeRuns(protocol, store, {"sft": 0}), [0], [0],
                          phase="grid", log=lambda _: None)  # fmt: skip
    recorded = protocol.read_json(store.selection_path)
    assert sorted(recorded) == ["luffy", "sft", "uniapl"] and recorded["sft"]["config"] == grids["sft"][3]


def test_finished_is_true_exactly_when_every_grid_and_test_run_is_on_disk(tmp_path):
    # `quality.py` rebuilds only the report of a finished regime (no student to build or check): a regime committed
    # from another machine's student reruns from a clone without being refused.
    protocol = load("quality_protocol")
    grids = {m: c for m, c in protocol.grids().items() if m in ("sft", "uniapl")}
    store = protocol.RunStore(str(tmp_path))
    assert not protocol.finished(store, grids, [0], [0, 1])
    protocol.run_protocol(store, grids, FakeRuns(protocol, store, {"sft": 1, "uniapl": 2}), [0], [0, 1],
                          phase="grid", log=lambda _: None)  # fmt: skip
    assert not protocol.finished(store, grids, [0], [0, 1])
    protocol.run_protocol(store, grids, FakeRuns(protocol, store, {"sft": 1, "uniapl": 2}), [0], [0, 1],
                          log=lambda _: None)  # fmt: skip
    assert protocol.finished(store, grids, [0], [0, 1])
    assert not protocol.finished(store, grids, [0], [0, 1, 2])  # a seed more is still to do
    record = protocol.read_json(store.test_path("sft", 1))
    protocol.write_json(store.test_path("sft", 1), {**record, "config": grids["sft"][0]})  # not the selection's
    assert not protocol.finished(store, grids, [0], [0, 1])


def test_a_base_regime_runs_its_own_grids_by_default_and_the_committed_regimes_hold_every_method():
    protocol, quality = load("quality_protocol"), load("quality")
    for regime, methods in protocol.REGIME_METHODS.items():
        grid = quality.regime_grid(argparse.Namespace(regime=regime, methods=None), {})
        assert list(grid) == list(methods) and "uniapl_fixed_ref" not in grid
    assert set(protocol.REGIME_METHODS["scarce"]) == {*protocol.CORE_METHODS, "luffy"}
    # `python benchmarks/quality.py --regime default` (and scarce) finds every run of its methods on disk, and the
    # variants it leaves out ran at UniAPL's selection in a variant regime on the same student, 5 test seeds each.
    results = os.path.join(BENCHMARKS, "results", "quality_protocol")
    variants = {"default": {"discriminators-default": ("uniapl_fixed_ref", "uniapl_frozen_disc")},
                "scarce": {"discriminators-scarce": ("uniapl_fixed_ref", "uniapl_frozen_disc"),
                           "lambda_sweep-scarce": ("uniapl_lambda0",)}}  # fmt: skip
    for regime in ("default", "scarce"):
        methods = protocol.REGIME_METHODS[regime]
        store = protocol.RunStore(os.path.join(results, regime))
        selection = protocol.read_json(store.selection_path)
        for method in methods:
            assert not selection[method].get("single_configuration"), (regime, method)
            for config in protocol.grids(regime)[method]:
                assert os.path.exists(store.grid_path(method, config, 0)), (regime, method, config)
            for seed in range(5):
                assert protocol.read_json(store.test_path(method, seed))["config"] == selection[method]["config"]
        uniapl = selection["uniapl"]["config"]
        for folder, names in variants[regime].items():
            variant_store = protocol.RunStore(os.path.join(results, folder))
            assert variant_store.recorded_student() == store.recorded_student(), folder
            for name in names:
                for seed in range(5):
                    config = protocol.read_json(variant_store.test_path(name, seed))["config"]
                    assert {k: config[k] for k in uniapl} == uniapl, (folder, name)


def test_shards_split_each_phase_into_disjoint_parts_that_cover_it(tmp_path):
    protocol = load("quality_protocol")
    grids = {m: c for m, c in protocol.grids().items() if m in ("sft", "grpo", "uniapl")}
    best = {"sft": 1, "grpo": 3, "uniapl": 0}
    store = protocol.RunStore(str(tmp_path))
    calls = []
    for phase in ("grid", "test"):  # as --jobs runs them: every grid shard, then every test shard
        for index in range(3):
            fake = FakeRuns(protocol, store, best)
            protocol.run_protocol(store, grids, fake, [0], [0, 1], phase=phase, shard=(index, 3), log=lambda _: None)
            assert all(call[3] == ("validation" if phase == "grid" else "test") for call in fake.calls)
            if phase == "test":  # seed by seed: a phase stopped part-way leaves every method at the same seeds
                assert [call[2] for call in fake.calls] == sorted(call[2] for call in fake.calls)
            calls += fake.calls
        if phase == "grid":  # what --jobs does once every grid shard has finished
            selection = protocol.select(protocol.load_grid_runs(store, grids, [0]), grids)
            protocol.write_json(store.selection_path, selection)
    assert len(calls) == len(set(calls)) == 3 * protocol.GRID_SIZE + 3 * 2
    assert {(m, c) for m, c, _, split in calls if split == "test"} == {
        (m, protocol.config_id(grids[m][best[m]])) for m in grids
    }


def test_workers_sharing_a_claims_folder_take_each_run_still_to_do_once_and_none_idles(tmp_path):
    import threading
    import time

    protocol = load("quality_protocol")
    grids = {m: c for m, c in protocol.grids().items() if m in ("sft", "uniapl")}
    best = {"sft": 1, "uniapl": 0}
    store = protocol.RunStore(str(tmp_path / "regime"))
    finished = FakeRuns(protocol, store, best)
    protocol.run_protocol(store, grids, finished, [0], [0], phase="grid", log=lambda _: None)
    protocol.run_protocol(store, grids, finished, [0], [0], phase="test", log=lambda _: None)  # seed 0: on disk

    class Slow(FakeRuns):
        def __call__(self, method, config, seed, split):
            time.sleep(0.05 if method == "uniapl" else 0.01)  # runs of different lengths
            return super().__call__(method, config, seed, split)

    workers = [Slow(protocol, store, best) for _ in range(2)]
    claims = tmp_path / "claims"
    claims.mkdir()
    threads = [
        threading.Thread(
            target=protocol.run_protocol,
            args=(store, grids, worker, [0], [0, 1, 2, 3]),
            kwargs={
                "phase": "test",
                "shard": (index, 2),
                "claim": protocol.claimer(str(claims)),
                "log": lambda _: None,
            },
        )  # fmt: skip
        for index, worker in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = [call for worker in workers for call in worker.calls]
    assert sorted((c[0], c[2]) for c in calls) == sorted((m, s) for m in grids for s in (1, 2, 3))  # once each
    # A worker takes whatever no other worker has claimed, whatever its shard index: alone, the second of two takes
    # seed 4 of both methods (a fixed every-second-run split would give it uniapl's only).
    alone = FakeRuns(protocol, store, best)
    (tmp_path / "claims4").mkdir()
    protocol.run_protocol(store, grids, alone, [0], [0, 1, 2, 3, 4], phase="test", shard=(1, 2),
                          claim=protocol.claimer(str(tmp_path / "claims4")), log=lambda _: None)  # fmt: skip
    assert sorted((c[0], c[2]) for c in alone.calls) == [("sft", 4), ("uniapl", 4)]


def test_bootstrap_ci_over_seeds_and_prompts_on_toy_input():
    stats = load("quality_stats")
    n = 400
    constant = {**_toy_per_prompt(1.0, n), "prompt_strict": [1] * n}
    out = stats.bootstrap([constant, constant], num_samples=200)
    assert out["prompt_level_strict_acc"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n_seeds": 2, "n_prompts": n}
    assert out["inst_level_strict_acc"]["mean"] == pytest.approx(1.0)
    assert out["length_wasserstein_to_expert"]["mean"] == pytest.approx(2.0)
    assert out["unrequested_effect_rate_mean"]["mean"] == 0.0

    # Bernoulli(0.3) prompts: the 95% interval holds 0.3 and has about the binomial width (3 seeds x 400 prompts;
    # resampling prompts shared across seeds gives about 2 x 1.96 x sqrt(0.21 / 400) = 0.09).
    runs = [_toy_per_prompt(0.3, n, seed=s) for s in range(3)]
    ci = stats.bootstrap(runs, num_samples=1000)["prompt_level_strict_acc"]
    assert ci["low"] < 0.3 < ci["high"] and 0.04 < ci["high"] - ci["low"] < 0.15
    assert ci["mean"] == pytest.approx(np.mean([np.mean(r["prompt_strict"]) for r in runs]))

    # Seeds are resampled too: two seeds that score every prompt alike (0 and 1) leave prompt resampling no
    # variance, yet the interval spans both.
    zero, one = {**constant, "prompt_strict": [0] * n}, constant
    ci = stats.bootstrap([zero, one], num_samples=400)["prompt_level_strict_acc"]
    assert ci["mean"] == 0.5 and ci["low"] == 0.0 and ci["high"] == 1.0

    # Paired differences: identical runs give exactly 0; a run that passes 40 more prompts than its pair gives +0.1
    # (the number of those 40 in a resample of 400 has a standard deviation of 6: about ±0.03).
    paired = stats.bootstrap(runs, baseline=runs, num_samples=200)["prompt_level_strict_acc"]
    assert paired["mean"] == paired["low"] == paired["high"] == 0.0
    better = [{**r, "prompt_strict": [1] * 40 + r["prompt_strict"][40:]} for r in runs]
    shift = [{**r, "prompt_strict": [0] * 40 + r["prompt_strict"][40:]} for r in runs]
    diff = stats.bootstrap(better, baseline=shift, num_samples=500)["prompt_level_strict_acc"]
    assert diff["mean"] == pytest.approx(0.1) and 0.06 < diff["low"] < 0.1 < diff["high"] < 0.14


@pytest.mark.slow
def test_quality_quick_end_to_end_resumes_and_reports(tmp_path, student_cache):
    quality, stats = load("quality"), load("quality_stats")
    methods = quality.available_methods()  # uniapl_fixed_ref only once UniAPLConfig has `reference_scorer`
    common = ["--quick", "--student_fast", "--student_cache", student_cache, "--output_dir", str(tmp_path),
              "--num_bootstrap", "50", "--set", "num_validation=12", "num_test=12", "eval_max_new_tokens=12",
              "max_completion_length=12"]  # fmt: skip
    argv = [*common, "--methods", *methods]  # every method, uniapl_fixed_ref too (not in REGIME_METHODS["default"])
    out = quality.main(argv)
    root = tmp_path / "default-quick"
    for name in (
        "quality.json",
        "quality.md",
        "selection.json",
        "settings.json",
        "reference.json",
        "quality_accuracy.png",
    ):
        assert (root / name).is_file(), name
    assert out["complete"] and set(out["results"]) == set(methods)
    runs = sorted((root / "runs").rglob("*.json"))
    assert len(runs) == len(methods) * (4 + 1)
    for path in runs:
        run = json.loads(path.read_text())
        assert run["split"] == ("validation" if "grid" in path.parts else "test")
        assert run["train_seconds"] > 0 and len(run["history"]) >= 1
        assert run["budget"]["optimizer_steps"] == 2
        # The bootstrap's per-prompt recomputation gives exactly evaluate_ifeval's and expert_logprob's numbers.
        recomputed = stats.metric_values(stats._as_arrays(run["per_prompt"]))
        for key in stats.REPORT_METRICS:
            assert recomputed[key] == pytest.approx(run["metrics"][key], abs=1e-9), (path.name, key)
    table = (root / "quality.md").read_text()
    assert all(f"| {method} |" in table for method in methods) and "Paired differences" in table
    assert "untrained student" in table and "frac_reward_zero_std" in table
    assert "minus_reference" in out["results"]["sft"] and "minus_reference" not in out["results"]["uniapl"]

    # Rerunning the command trains nothing.
    mtimes = {path: path.stat().st_mtime_ns for path in runs}
    quality.main(argv)
    assert {path: path.stat().st_mtime_ns for path in runs} == mtimes

    # The switch-point regime starts from this selection: the runs at the base grid's own switch are copied from it,
    # the other switch points (and the one-run staged trainer at λ = 0) train; with --jobs the parent copies them
    # before its workers queue the runs still to do.
    switch = quality.main([*common, "--regime", "switch_points", "--base", "default", "--jobs", "2"])
    switch_root = tmp_path / "switch_points-default-quick"
    assert switch["complete"] and "sft_then_grpo_switch25" in switch["results"]
    for method in ("uniapl", "sft_then_grpo", "sft_then_agrpo"):
        assert "copied_from" in json.loads((switch_root / "runs" / "test" / method / "seed0.json").read_text())
    trained = json.loads(
        (switch_root / "runs" / "test" / "sft_then_agrpo_lambda0_switch75" / "seed0.json").read_text()
    )
    assert "copied_from" not in trained and trained["config"]["adversarial_coef"] == 0.0


@pytest.mark.slow
def test_quality_jobs_run_shards_in_processes_and_report(tmp_path, student_cache):
    quality = load("quality")
    argv = ["--quick", "--student_fast", "--student_cache", student_cache, "--output_dir", str(tmp_path),
            "--methods", "sft", "--jobs", "2", "--num_bootstrap", "20", "--set", "num_validation=8", "num_test=8",
            "eval_max_new_tokens=8"]  # fmt: skip
    out = quality.main(argv)
    root = tmp_path / "default-quick"
    assert out["complete"] and out["results"]["sft"]["finished_seeds"] == [0]
    assert len(list((root / "runs" / "grid" / "sft").glob("*.json"))) == 4
    assert sorted(p.name for p in (root / "logs").iterdir()) == [f"{phase}-shard{i}.txt" for phase in ("grid", "test")
                                                                  for i in (0, 1)]  # fmt: skip
    assert json.loads((root / "selection.json").read_text())["sft"]["config_id"]


def test_discriminators_regime_compares_co_trained_frozen_and_reference_scorers_at_the_selected_configuration(
    tmp_path,
):
    protocol, quality = load("quality_protocol"), load("quality")
    argv = ["--regime", "discriminators", "--base", "default", "--output_dir", str(tmp_path), "--report"]
    with pytest.raises(SystemExit, match="--regime default --phase grid"):
        quality.main(argv)
    selected = {"learning_rate": 0.001, "sft_coef": 1.0}
    variants = protocol.discriminator_grids({"uniapl": {"config": selected}})
    assert variants == {
        "uniapl": [selected],
        "uniapl_frozen_disc": [{**selected, "discriminator_freeze_after_updates": protocol.FREEZE_AFTER_UPDATES}],
        "uniapl_fixed_ref": [selected],
    }
    assert [protocol.method_kind(m) for m in ("uniapl_frozen_disc", "uniapl_fixed_ref", "uniapl_no_disc", "sft")] == [
        "uniapl",
        "uniapl_fixed_ref",
        "uniapl_no_disc",
        "sft",
    ]
    assert quality.budget("uniapl_frozen_disc", quality.FULL) == quality.budget("uniapl", quality.FULL)


def test_switch_points_regime_moves_only_the_switch_of_the_selected_staged_configurations():
    protocol, quality = load("quality_protocol"), load("quality")
    staged = {"sft_learning_rate": 0.002, "learning_rate": 0.0005}
    selection = {"uniapl": {"config": {"learning_rate": 0.001}}, "sft_then_grpo": {"config": staged}}
    with pytest.raises(ValueError, match=r"\['sft_then_agrpo'\]"):
        protocol.switch_grids(selection)
    selection["sft_then_agrpo"] = {"config": {**staged, "learning_rate": 0.0002}}
    variants = protocol.switch_grids(selection)
    assert variants["sft_then_grpo"] == [staged]  # the base grid's own switch: reused, not trained again
    assert variants["sft_then_grpo_switch25"] == [{**staged, "sft_fraction": 0.25}]
    assert variants["sft_then_agrpo_switch75"] == [{**staged, "learning_rate": 0.0002, "sft_fraction": 0.75}]
    assert variants["sft_then_agrpo_lambda0_switch50"][0]["adversarial_coef"] == 0.0
    assert len(variants) == 1 + 3 * len(protocol.SWITCH_FRACTIONS)
    kinds = {name: protocol.method_kind(name) for name in variants}
    assert kinds["sft_then_grpo_switch25"] == "sft_then_grpo"
    assert kinds["sft_then_agrpo_lambda0_switch25"] == "sft_then_agrpo"
    settings = {**quality.FULL, "sft_fraction": 0.25}
    assert quality.budget("sft_then_grpo_switch25", settings)["sft_steps"] == round(0.25 * quality.FULL["steps"])


def test_edges_regime_checks_one_step_beyond_each_setting_selected_at_its_grids_end():
    protocol = load("quality_protocol")
    assert protocol.outward((0.002, 0.004), 0.004) == 0.008 and protocol.outward((0.002, 0.004), 0.002) == 0.001
    assert protocol.outward((0.3, 1.0), 1.0) == 3.0 and protocol.outward((1e-4, 2e-4, 5e-4, 1e-3), 1e-4) == 5e-5
    selection = {
        "sft": {"config": {"learning_rate": 0.004}},  # inside its grid: nothing to check
        "grpo": {"config": {"learning_rate": 0.0001}},
        "sft_then_agrpo": {"config": {"sft_learning_rate": 0.004, "learning_rate": 0.0005}},
        "uniapl": {"config": {"learning_rate": 0.002, "sft_coef": 1.0}},
        "uniapl_no_disc": {"config": {"learning_rate": 0.002, "sft_coef": 1.0}},  # not a core method
    }
    variants = protocol.edge_grids(selection)
    assert list(variants) == ["grpo", "sft_then_agrpo", "uniapl"]
    assert variants["grpo"] == [{"learning_rate": 0.0001}, {"learning_rate": 5e-05}]
    assert variants["sft_then_agrpo"][1:] == [
        {"sft_learning_rate": 0.004, "learning_rate": 0.001},
        {"sft_learning_rate": 0.008, "learning_rate": 0.0005},
    ]
    assert variants["uniapl"] == [
        {"learning_rate": 0.002, "sft_coef": 1.0},
        {"learning_rate": 0.001, "sft_coef": 1.0},
        {"learning_rate": 0.002, "sft_coef": 3.0},
    ]


def test_an_edges_selection_is_closed_in_turn_along_the_line_through_it(tmp_path):
    protocol, quality = load("quality_protocol"), load("quality")
    edges_grid = [{"learning_rate": 0.002, "sft_coef": 1.0}, {"learning_rate": 0.001, "sft_coef": 1.0},
                  {"learning_rate": 0.002, "sft_coef": 3.0}]  # fmt: skip
    staged = {"sft_learning_rate": 0.004, "learning_rate": 0.0005}
    staged_grid = [staged, {**staged, "learning_rate": 0.001}, {**staged, "sft_learning_rate": 0.008}]
    selection = {
        "uniapl": {"config": {"learning_rate": 0.002, "sft_coef": 3.0}, "grid": edges_grid},
        "sft_then_agrpo": {"config": staged, "grid": staged_grid},  # interior once its edges were run
    }
    # α: 0.3, 1 (base grid), 3 (the edges regime's point) at lr 2e-3 -> 9; lr at α 3 has one value: nothing to close
    assert protocol.edge_grids(selection) == {
        "uniapl": [{"learning_rate": 0.002, "sft_coef": 3.0}, {"learning_rate": 0.002, "sft_coef": 9.0}]
    }
    # select() records the grid it chose from, which is what a later edges pass reads
    runs = {"uniapl": {protocol.config_id(c): [{"split": "validation", "metrics": {"prompt_level_strict_acc": i}}]
                       for i, c in enumerate(edges_grid)}}  # fmt: skip
    assert protocol.select(runs, {"uniapl": edges_grid})["uniapl"]["grid"] == edges_grid
    # the variant regimes run from such a selection: `--base edges-default`, with the default regime's settings
    base = protocol.RunStore(str(tmp_path / "edges-default"))
    base.check_settings({**quality.FULL, **protocol.REGIMES["default"], "data_seed": 0})
    protocol.write_json(base.selection_path, selection)
    argv = ["--regime", "lambda_sweep", "--base", "edges-default", "--output_dir", str(tmp_path), "--report"]
    out = quality.main(argv)
    assert out["selection"]["uniapl_lambda1"]["config"] == {
        "learning_rate": 0.002,
        "sft_coef": 3.0,
        "adversarial_coef": 1.0,
    }
    assert (tmp_path / "lambda_sweep-edges-default" / "quality.md").exists()
    with pytest.raises(SystemExit):
        quality.main(["--regime", "lambda_sweep", "--base", "edges-nope", "--output_dir", str(tmp_path), "--report"])


def test_distinct_bigrams_fall_when_responses_repeat_the_same_phrasing():
    stats = load("quality_stats")
    assert stats.distinct_ngrams(["a b c", "d e f"], 2) == 1.0
    assert stats.distinct_ngrams(["a b c", "a b c"], 2) == 0.5
    assert stats.distinct_ngrams(["one", ""], 2) is None


def test_a_variant_with_one_configuration_goes_to_test_without_a_validation_run(tmp_path):
    protocol = load("quality_protocol")
    grid = {"uniapl": [{"learning_rate": 0.002}], "sft_then_grpo_switch25": [{"sft_fraction": 0.25}],
            "sft": [{"learning_rate": 0.001}, {"learning_rate": 0.002}]}  # fmt: skip
    calls = []

    def fake(method, config, seed, split):
        calls.append((method, split))
        score = 0.3 if config.get("learning_rate") == 0.002 else 0.2
        return {"metrics": {"prompt_level_strict_acc": score}, "per_prompt": _toy_per_prompt(score, seed=seed),
                "train_seconds": 1.0, "budget": {"samples": 0}}  # fmt: skip

    store = protocol.RunStore(str(tmp_path))
    selection = protocol.run_protocol(store, grid, fake, [0], [0, 1], log=lambda _: None)
    assert [c for c in calls if c[1] == "validation"] == [("sft", "validation")] * 2
    assert sorted(c[0] for c in calls if c[1] == "test") == sorted([*grid] * 2)
    assert selection["uniapl"]["single_configuration"] and selection["uniapl"]["validation_score"] is None
    assert selection["sft"]["config"] == {"learning_rate": 0.002}
    out = protocol.report(store, grid, [0], [0, 1], num_bootstrap=20)
    assert out["complete"]
    assert (
        "| uniapl | **learning_rate=0.002** | – (one configuration, not tuned) |"
        in (tmp_path / "quality.md").read_text()
    )


def test_methods_picks_variants_of_a_variant_regime(tmp_path):
    protocol, quality = load("quality_protocol"), load("quality")
    base = protocol.RunStore(str(tmp_path / "default"))
    settings = {**quality.FULL, **protocol.REGIMES["default"], "data_seed": 0}
    base.check_settings(settings)
    selection = {"uniapl": {"config": {"learning_rate": 0.002, "sft_coef": 1.0}},
                 "sft_then_agrpo": {"config": {"sft_learning_rate": 0.004, "learning_rate": 0.0005}}}  # fmt: skip
    protocol.write_json(base.selection_path, selection)
    argv = ["--regime", "edges", "--base", "default", "--output_dir", str(tmp_path), "--report"]
    assert set(quality.main(argv)["results"]) == {"uniapl", "sft_then_agrpo"}
    assert set(quality.main([*argv, "--methods", "uniapl"])["results"]) == {"uniapl"}
    with pytest.raises(SystemExit, match=r"--methods \['sft'\]: not variants of --regime edges"):
        quality.main([*argv, "--methods", "sft"])
    with pytest.raises(SystemExit, match=r"--methods \['nope'\]: unknown"):
        quality.main(["--report", "--output_dir", str(tmp_path), "--methods", "nope"])


def test_a_test_run_copied_at_an_earlier_selection_is_replaced_and_a_trained_one_is_refused(tmp_path):
    protocol = load("quality_protocol")
    grids = {"sft": protocol.grids()["sft"]}
    store = protocol.RunStore(str(tmp_path))
    earlier = grids["sft"][0]
    protocol.write_json(store.test_path("sft", 0), {"config": earlier, "copied_from": "elsewhere", "seed": 0})
    fake = FakeRuns(protocol, store, {"sft": 2})
    protocol.run_protocol(store, grids, fake, [0], [0], log=lambda _: None)
    assert fake.calls[-1] == ("sft", protocol.config_id(grids["sft"][2]), 0, "test")
    assert protocol.read_json(store.test_path("sft", 0))["config"] == grids["sft"][2]

    moved = FakeRuns(protocol, store, {"sft": 3})
    for config in grids["sft"]:
        os.remove(store.grid_path("sft", config, 0))
    with pytest.raises(ValueError, match=r"was trained at learning_rate=0.004, but the selection is now "):
        protocol.run_protocol(store, grids, moved, [0], [0], log=lambda _: None)


def test_runs_are_recorded_with_their_student_and_copied_only_from_the_same_student(tmp_path, capsys):
    protocol, quality = load("quality_protocol"), load("quality")
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"weights")
    store = protocol.RunStore(str(tmp_path / "edges-default"))
    sha = quality.record_student(store, str(student))
    assert store.recorded_student() == sha and len(sha) == 64
    assert quality.record_student(store, str(student)) == sha  # the same student: accepted
    (student / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(SystemExit, match=f"student {sha[:8]}…, but this machine's student is"):
        quality.record_student(store, str(student))
    unrecorded = protocol.RunStore(str(tmp_path / "old"))
    protocol.write_json(unrecorded.test_path("sft", 0), {})
    with pytest.raises(SystemExit, match="no record of their student"):
        quality.record_student(unrecorded, str(student))

    base = protocol.RunStore(str(tmp_path / "default"))
    selected = {"learning_rate": 0.002, "sft_coef": 1.0}
    protocol.write_json(base.test_path("uniapl", 0), {"config": selected, "seed": 0})
    (tmp_path / "default" / "test_student.sha256").write_text(f"{'0' * 64}  model.safetensors\n")
    args = quality.argparse.Namespace(output_dir=str(tmp_path), base="default", quick=False)
    quality.reuse_base_runs(args, store, {"uniapl": [selected]}, [0], [0], sha)
    assert "not reusing" in capsys.readouterr().out and not os.path.exists(store.test_path("uniapl", 0))
    quality.reuse_base_runs(args, store, {"uniapl": [selected]}, [0], [0], "0" * 64)
    assert protocol.read_json(store.test_path("uniapl", 0))["copied_from"] == base.test_path("uniapl", 0)


def test_report_lists_an_earlier_grids_runs_without_selecting_them(tmp_path):
    protocol = load("quality_protocol")
    grids = {"sft": protocol.grids()["sft"]}
    store = protocol.RunStore(str(tmp_path))
    earlier = {"learning_rate": 0.016}  # not in the current grid, and the best validation score on disk
    assert protocol.config_id(earlier) not in {protocol.config_id(c) for c in grids["sft"]}
    protocol.write_json(store.grid_path("sft", earlier, 0), {"config": earlier, "seed": 0, "split": "validation",
                        "metrics": {"prompt_level_strict_acc": 0.99, "inst_level_strict_acc": 0.99}})  # fmt: skip
    protocol.run_protocol(store, grids, FakeRuns(protocol, store, {"sft": 2}), [0], [0], log=lambda _: None)
    out = protocol.report(store, grids, [0], [0], num_bootstrap=20)
    assert out["selection"]["sft"]["config"] == grids["sft"][2]
    assert [(p["method"], p["config_id"]) for p in out["superseded_grid"]] == [("sft", "learning_rate=0.016")]
    assert "| sft | learning_rate=0.016 | 0 | 99.0 | 99.0 |" in (tmp_path / "quality.md").read_text()


def test_quality_rejects_zero_jobs(tmp_path):
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        load("quality").main(["--quick", "--output_dir", str(tmp_path), "--jobs", "0"])


def test_lambda_sweep_starts_from_the_base_regimes_validation_selection(tmp_path):
    protocol, quality = load("quality_protocol"), load("quality")
    argv = ["--regime", "lambda_sweep", "--base", "scarce", "--output_dir", str(tmp_path), "--report"]
    with pytest.raises(SystemExit, match="--regime scarce --phase grid"):
        quality.main(argv)

    selected = {"learning_rate": 0.004, "sft_coef": 1.0, "adversarial_coef": 0.5}
    sweep = protocol.sweep_grids({"uniapl": {"config": selected}})
    assert sweep["uniapl"] == [selected] and {len(configs) for configs in sweep.values()} == {1}
    lambdas = sorted(c[0]["adversarial_coef"] for m, c in sweep.items() if m != "uniapl_lagrangian")
    assert lambdas == sorted({*protocol.SWEEP_LAMBDAS, 0.5})
    assert sweep["uniapl_lagrangian"][0]["adversarial_coef_mode"] == "lagrangian"
    assert all(c[0]["learning_rate"] == 0.004 for c in sweep.values())
    assert all(quality.budget(m, quality.FULL) == quality.budget("uniapl", quality.FULL) for m in sweep)

    # The reference configuration's runs are copied from the base regime, not trained again; other configs are not.
    source, target = protocol.RunStore(str(tmp_path / "a")), protocol.RunStore(str(tmp_path / "b"))
    for seed in (0, 1):
        protocol.write_json(source.test_path("uniapl", seed), {"config": selected, "seed": seed})
    protocol.write_json(source.grid_path("uniapl", selected, 0), {"config": selected, "seed": 0})
    assert protocol.reuse_runs(source, target, "uniapl", selected, [0], [0, 1, 2]) == 3
    assert protocol.read_json(target.test_path("uniapl", 1))["seed"] == 1
    assert not os.path.exists(target.test_path("uniapl", 2))
    other = protocol.RunStore(str(tmp_path / "c"))
    assert protocol.reuse_runs(source, other, "uniapl", {**selected, "adversarial_coef": 0.1}, [0], [0, 1]) == 0

    # With the base regime's selection and settings on disk, the sweep's report lists every variant as pending.
    base = protocol.RunStore(str(tmp_path / "scarce"))
    settings = {**quality.FULL, **protocol.REGIMES["scarce"], "data_seed": 0}
    base.check_settings(settings)
    protocol.write_json(base.selection_path, {"uniapl": {"config": selected}})
    out = quality.main(argv)
    assert set(out["results"]) == set(sweep) and not out["complete"]


def test_learning_curve_writes_each_point_on_validation_and_resumes(tmp_path, student_cache):
    curve = load("learning_curve")
    argv = ["--quick", "--student_fast", "--student_cache", student_cache, "--output_dir", str(tmp_path),
            "--runs", "sft_lr2e-3", "--checkpoints", "1", "2"]  # fmt: skip
    out = curve.main(argv)
    points = out["runs"]["sft_lr2e-3"]["points"]
    assert [p["step"] for p in points] == [1, 2] and points[0]["train_seconds_to_step"] > 0
    for step in (1, 2):
        record = json.loads((tmp_path / "sft_lr2e-3" / f"step{step}.json").read_text())
        assert record["split"] == "validation" and record["run_steps"] == 2
        assert record["budget_to_step"]["demonstrations_seen"] == step * load("quality").QUICK["sft_batch_size"]
    assert (tmp_path / "curve.md").is_file() and (tmp_path / "reference.json").is_file()
    # Every point on disk: nothing is trained again.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "sft_lr2e-3").iterdir()}
    curve.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sft_lr2e-3").iterdir()} == mtimes


def test_cost_curves_count_steps_across_a_staged_runs_two_trainers(tmp_path, student_cache):
    curve, quality = load("learning_curve"), load("quality")
    argv = ["--cost", "--quick", "--student_fast", "--student_cache", student_cache, "--output_dir", str(tmp_path),
            "--runs", "cost_sft_then_grpo", "cost_sft_then_agrpo", "--checkpoints", "1", "2"]  # fmt: skip
    out = curve.main(argv)
    batch = quality.QUICK["per_device_train_batch_size"]
    for run in ("cost_sft_then_grpo", "cost_sft_then_agrpo"):
        points = out["runs"][run]["points"]
        # step 1 is the SFT phase (no rollouts), step 2 the RL phase: the second trainer's step 1 is step 2
        assert [(p["step"], p["samples"]) for p in points] == [(1, 0), (2, batch)], run
        assert points[1]["train_seconds_to_step"] > points[0]["train_seconds_to_step"]
    reach = out["cost_to_reach"]
    final = out["runs"]["cost_sft_then_agrpo"]["points"][-1]
    assert reach["target"] == final["prompt_level_strict_acc"]
    assert reach["runs"]["cost_sft_then_agrpo"]["step"] <= 2
    assert (tmp_path / "cost_curves.png").is_file() and "## Cost to reach" in (tmp_path / "curve.md").read_text()


def test_cost_to_reach_takes_the_first_point_at_the_pipelines_final_score():
    curve = load("learning_curve")

    def points(scores, seconds_per_step):
        rows = [(25 * (i + 1), score) for i, score in enumerate(scores)]
        return {"points": [{"step": step, "samples": 0, "prompt_level_strict_acc": score,
                            "train_seconds_to_step": seconds_per_step * step} for step, score in rows]}  # fmt: skip

    runs = {"cost_sft_then_agrpo": points([0.1, 0.2, 0.3], 1.0), "cost_sft": points([0.25, 0.3, 0.2], 0.5),
            "cost_grpo": points([0.05, 0.1, 0.1], 1.0)}  # fmt: skip
    reach = curve.cost_to_reach(runs)
    assert reach["target"] == 0.3 and reach["runs"]["cost_grpo"] is None
    assert reach["runs"]["cost_sft"] == {
        "step": 50,
        "samples": 0,
        "train_seconds": 25.0,
        "seconds_over_target": 25 / 75,
    }


def test_cost_runs_are_the_configurations_selected_on_validation():
    curve = load("learning_curve")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality_protocol"
    default = json.loads((results / "default" / "selection.json").read_text())
    edges = json.loads((results / "edges-edges-default" / "selection.json").read_text())
    for run, (method, config) in curve.COST_RUNS.items():
        selected = (edges if method == "uniapl" else default)[method]["config"]
        assert config == selected, run


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
    assert breakdown["adversarial_other"] > 0  # encoding and A_adv, timed around `AdversarialTerm.advantages`
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


def test_quality_compare_pairs_runs_of_two_folders_with_the_same_settings(tmp_path):
    protocol, compare = load("quality_protocol"), load("quality_compare")
    a, b = protocol.RunStore(str(tmp_path / "a")), protocol.RunStore(str(tmp_path / "b"))
    for store in (a, b):
        store.check_settings({"steps": 60})
    n = 200
    for seed in (0, 1):
        base = _toy_per_prompt(0.3, n, seed=seed)
        protocol.write_json(a.test_path("variant", seed), {"seed": seed, "per_prompt": base})
        better = {**base, "prompt_strict": [1] * 20 + base["prompt_strict"][20:]}  # 20 more prompts passed at most
        protocol.write_json(b.test_path("baseline", seed), {"seed": seed, "per_prompt": better})
    output = tmp_path / "paired.json"
    argv = ["--reference", a.root, "variant", "--against", b.root, "baseline", "--output", str(output),
            "--num_bootstrap", "50"]  # fmt: skip
    out = compare.main(argv)
    difference = out["minus_reference"]["baseline"]["prompt_level_strict_acc"]
    assert 0 < difference["mean"] <= 0.1 and out["minus_reference"]["baseline"]["seeds"] == [0, 1]
    assert json.loads(output.read_text())["reference"]["method"] == "variant"
    assert out["students"] == {a.root: None, b.root: None}
    (tmp_path / "a" / "student.sha256").write_text(f"{'1' * 64}  model.safetensors\n")
    assert compare.main(argv)["students"][a.root] == "1" * 64  # runs on two students: recorded beside the result
    protocol.write_json(os.path.join(b.root, "settings.json"), {"steps": 120})
    with pytest.raises(ValueError, match="other settings"):
        compare.main(argv)


def test_training_curves_average_each_signal_per_step_over_seeds_and_are_plotted(tmp_path):
    protocol = load("quality_protocol")
    runs = [
        {"history": [{"step": 1, "frac_reward_zero_std": 0.5, "discriminator/acc_real": 0.4}, {"step": 2}]},
        {"history": [{"step": 1, "frac_reward_zero_std": 0.1}, {"step": 2, "frac_reward_zero_std": 0.3}]},
        {"history": []},  # SFT logs none of the signals
    ]
    curves = protocol.training_curves(runs)
    assert curves["frac_reward_zero_std"] == {"step": [1, 2], "mean": [pytest.approx(0.3), pytest.approx(0.3)]}
    assert curves["discriminator/acc_real"] == {"step": [1], "mean": [0.4]}
    assert "adversarial/coef" not in curves and protocol.training_curves(runs[2:]) == {}

    stat = {"mean": 0.1, "low": 0.05, "high": 0.15}
    out = {
        "reference_method": "uniapl",
        "results": {
            "uniapl": {"test": {"prompt_level_strict_acc": stat}, "training_curves": curves},
            "sft": {"test": {"prompt_level_strict_acc": stat}, "training_curves": {}},
        },
    }
    assert protocol.plot(out, str(tmp_path)) == ["quality_accuracy.png", "quality_signals.png"]
    assert (tmp_path / "quality_signals.png").stat().st_size > 0
    out["results"]["uniapl"]["training_curves"] = {}
    assert protocol.plot(out, str(tmp_path)) == ["quality_accuracy.png"]  # no signal logged: no empty figure


def test_summary_checks_the_target_against_the_best_baseline_from_the_reports_own_paired_intervals(tmp_path):
    summary = load("quality_summary")

    def stat(mean, low, high):
        return {"mean": mean, "low": low, "high": high}

    def entry(accuracy, minus_uniapl=None, **metrics):
        test = {"prompt_level_strict_acc": stat(accuracy, accuracy - 0.02, accuracy + 0.02)}
        test.update({key: stat(value, value, value) for key, value in metrics.items()})
        out = {"test": test}
        if minus_uniapl is not None:
            out["minus_reference"] = {"prompt_level_strict_acc": stat(*minus_uniapl)}
        return out

    distribution = {"length_wasserstein_to_expert": 10.0, "expert_logp": -3.0, "unrequested_effect_rate_mean": 0.05}
    report = {
        "reference_method": "uniapl",
        "complete": True,
        "settings": {"sft_coef": 1.0},
        "results": {
            "uniapl": {**entry(0.12, **distribution), "config": {"learning_rate": 4e-4}},
            "grpo": entry(0.08, (-0.04, -0.06, -0.01), **{**distribution, "length_wasserstein_to_expert": 20.0}),
            "sft": entry(0.05, (-0.07, -0.09, -0.05), **{**distribution, "expert_logp": -2.0}),
            "uniapl_no_disc": entry(0.11, (-0.01, -0.02, 0.005), **distribution),
        },
    }
    row = summary.summarise(report)
    assert row["best_baseline"] == "grpo"  # the best baseline by test mean; the ablation is not a baseline
    assert row["uniapl_minus_best_baseline"] == {"mean": 0.04, "low": 0.01, "high": 0.06}
    assert row["target_met"]  # +4 points, interval [1, 6] above 0
    assert row["closest_to_expert"]["expert_logp"] == "sft"
    assert row["closest_to_expert"]["length_wasserstein_to_expert"] != "grpo"
    assert row["discriminator_effect"]["prompt_level_strict_acc"] == {"mean": 0.01, "low": -0.005, "high": 0.02}
    assert row["uniapl_config"] == {"sft_coef": 1.0, "learning_rate": 4e-4}

    report["results"]["grpo"]["minus_reference"]["prompt_level_strict_acc"] = stat(-0.04, -0.08, 0.01)
    assert not summary.summarise(report)["target_met"]  # +4 points on the mean, but the interval reaches below 0
    report["complete"] = False
    with pytest.raises(ValueError, match="incomplete.*rerun"):
        summary.summarise(report)
