"""The quality protocol: regimes, equal-size tuning grids, a validation split, resumable runs, selection, report.

Nothing here trains a model: `run_protocol` calls a `train_and_evaluate(method, config, seed, split)` function
(the real one is in `quality.py`; tests pass a fake one), writes each finished run to its own JSON file at once, skips
the runs already on disk, selects each method's configuration on the validation split only, and only then runs the
seeds that are scored on the test split.

Layout of a regime's folder:

    settings.json                       the regime's settings (a rerun with other settings is refused)
    runs/grid/<method>/<config>-seed<k>.json   grid points, scored on the validation split
    selection.json                      the configuration chosen per method (validation only)
    runs/test/<method>/seed<k>.json     the selected configuration, scored once on the test split
    quality.json, quality.md            built by `report` from whatever is finished
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling quality_stats module
from quality_stats import REPORT_METRICS, bootstrap  # noqa: E402

from trl_uniapl.ifeval import task  # noqa: E402

METHODS = (
    "sft",
    "grpo",
    "sft_then_grpo",
    "sft_then_agrpo",
    "uniapl",
    "uniapl_no_disc",
    "uniapl_fixed_ref",
    "luffy",
)
# The core methods of issue 21: the ones tuned first if the machine cannot hold every grid.
CORE_METHODS = ("sft", "grpo", "sft_then_grpo", "sft_then_agrpo", "uniapl")
REFERENCE_METHOD = "uniapl"  # paired differences are reported against it
SELECTION_METRIC = "prompt_level_strict_acc"

# Tuning grids: GRID_SIZE points for every method, over each method's own range (docs/benchmarks.md, "Grids").
# Every run that reads demonstrations reads 16 per step (the decoupled SFT batch), eight times the 2 per step of the
# earlier protocol, so the SFT ranges moved up an octave: the 200-step indications had SFT at 20.4% with 2e-3
# against 15.8% at 1e-3, and the earlier protocol's tuning record (60 steps, 2 demonstrations per step) had SFT
# falling steadily above 1e-3 with those tiny batches. RL updates get far lower rates: GRPO collapsed into repeated
# words at 2e-3 and was best at 1e-3 at 60 steps, and runs at least three times longer need no larger steps
# (the SFT -> GRPO ran its GRPO phase at 3e-4). Two-dimensional grids (a learning rate per phase, or a learning
# rate and the SFT weight α) take two points per dimension inside the one-dimensional ranges.
# The default regime's first grid runs put SFT's best point on the edge of 5e-4..4e-3 (20.0, 20.0, 23.0, 25.5% on
# validation at 5e-4, 1e-3, 2e-3, 4e-3): the SFT range moved up an octave again, and the staged methods' SFT phase
# with it.
GRID_SIZE = 4
SFT_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
RL_LRS = (1e-4, 2e-4, 5e-4, 1e-3)
SFT_LRS_2 = (2e-3, 4e-3)
RL_LRS_2 = (2e-4, 5e-4)
# UniAPL's one learning rate drives both of its terms; α (`sft_coef`) sets the SFT term's share. With AdamW the step
# size follows the learning rate whatever α is, so a one-stage run whose SFT term leads needs SFT's learning rates:
# SFT's grid peaked at 4e-3 (25.5% on validation, 23.0% at 2e-3, 20.0% at 1e-3). α: the learning-curve probe had
# α 0.1 (the library's default then) at 11.0% and α 1 at 20.5% after 200 steps at 1e-3 (16 demonstrations per step),
# so the grid takes α 0.3 and the CHORD-style full weight 1.
UNIAPL_LRS_2 = (2e-3, 4e-3)
ALPHAS_2 = (0.3, 1.0)
# The λ sweep: fixed λ values from 0 (no discriminator) up to the range's end (A_adv and A_task have unit scale), about
# half a decade apart, plus the base regime's selected λ, and the Lagrangian mode (its initial λ is 0.1).
SWEEP_LAMBDAS = (0.0, 0.1, 0.3, 1.0)
# Updates after which the frozen-discriminator variant stops training its discriminator: the default
# discriminator warm-up (16 policy steps, one update per generation batch).
FREEZE_AFTER_UPDATES = 16
# Switch points of the staged methods: the SFT phase's share of the steps (the grids run at BASE_SFT_FRACTION,
# quality.FULL["sft_fraction"]).
BASE_SFT_FRACTION = 0.5
SWITCH_FRACTIONS = (0.25, 0.5, 0.75)


def grids(regime: str = "default") -> dict[str, list[dict[str, Any]]]:
    """Each method's tuning grid (the same in every regime): a list of setting overrides, GRID_SIZE of them each.

    The staged methods tune the learning rate of each phase (`sft_learning_rate`: their SFT phase; `learning_rate`:
    the RL phase), at the default λ for SFT → A-GRPO. The one-stage UniAPL variants share one grid (learning rate × α),
    so that each differs from UniAPL by its adversarial term only; their λ is the default (the λ sweep varies it).
    """
    if regime not in REGIMES:
        raise ValueError(f"Unknown regime {regime!r}; choose from {list(REGIMES)}.")
    staged = [{"sft_learning_rate": a, "learning_rate": b} for a in SFT_LRS_2 for b in RL_LRS_2]
    one_stage = [{"learning_rate": lr, "sft_coef": alpha} for lr in UNIAPL_LRS_2 for alpha in ALPHAS_2]
    return {
        "sft": [{"learning_rate": lr} for lr in SFT_LRS],
        "grpo": [{"learning_rate": lr} for lr in RL_LRS],
        "sft_then_grpo": staged,
        "sft_then_agrpo": [dict(c) for c in staged],
        "uniapl": one_stage,
        "uniapl_no_disc": [dict(c) for c in one_stage],
        "uniapl_fixed_ref": [dict(c) for c in one_stage],
        "luffy": [{"learning_rate": lr} for lr in RL_LRS],
    }


def sweep_grids(base_selection: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The λ sweep: UniAPL at the base regime's selected configuration, and one method per other λ and the Lagrangian
    mode at the same learning rate and α. Each has a single configuration (nothing is chosen among them), so the test
    split scores every variant and the sweep is reported with confidence intervals, without selection on it."""
    selected = dict(base_selection["uniapl"]["config"])
    variants = {REFERENCE_METHOD: [selected]}
    for lam in SWEEP_LAMBDAS:
        if lam != selected.get("adversarial_coef", DEFAULT_LAMBDA):
            variants[f"uniapl_lambda{lam:g}"] = [{**selected, "adversarial_coef": lam}]
    variants["uniapl_lagrangian"] = [{**selected, "adversarial_coef": 0.1, "adversarial_coef_mode": "lagrangian"}]
    return variants


def discriminator_grids(base_selection: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Fixed against co-trained discriminator (issue 21, item 4): UniAPL at the base regime's selected configuration
    (the online discriminator trained throughout), the same discriminator frozen after its warm-up's updates
    (`discriminator_freeze_after_updates`), and the paper's fixed reference-conditioned scorer at the same
    configuration. One configuration each, all scored on test with the same seeds and compared paired."""
    selected = dict(base_selection["uniapl"]["config"])
    return {
        REFERENCE_METHOD: [selected],
        "uniapl_frozen_disc": [{**selected, "discriminator_freeze_after_updates": FREEZE_AFTER_UPDATES}],
        "uniapl_fixed_ref": [dict(selected)],
    }


def switch_grids(base_selection: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Where to switch from SFT to RL (issue 21, item 4): SFT → GRPO and SFT → A-GRPO at their selected learning rates
    with the SFT phase at each of SWITCH_FRACTIONS of the steps (the base grid's own `sft_fraction` is one of them,
    whose runs are the base regime's), and SFT → A-GRPO with λ = 0 at each (the same one-run staged trainer without
    its discriminator: what separates the two staged methods beyond λ). UniAPL's selected run is the reference."""
    missing = [m for m in (REFERENCE_METHOD, "sft_then_grpo", "sft_then_agrpo") if m not in base_selection]
    if missing:
        raise ValueError(f"The switch-point regime needs the base regime's selection of {missing}: run their grids.")
    variants = {REFERENCE_METHOD: [dict(base_selection[REFERENCE_METHOD]["config"])]}
    for method in ("sft_then_grpo", "sft_then_agrpo"):
        selected = dict(base_selection[method]["config"])
        for fraction in SWITCH_FRACTIONS:
            name = method if fraction == BASE_SFT_FRACTION else f"{method}_switch{round(fraction * 100)}"
            variants[name] = [selected if fraction == BASE_SFT_FRACTION else {**selected, "sft_fraction": fraction}]
    selected = dict(base_selection["sft_then_agrpo"]["config"])
    for fraction in SWITCH_FRACTIONS:
        variants[f"sft_then_agrpo_lambda0_switch{round(fraction * 100)}"] = [
            {**selected, "sft_fraction": fraction, "adversarial_coef": 0.0}
        ]
    return variants


def outward(values: Sequence[float], edge: float) -> float:
    """The next grid value beyond `edge`, an end of `values`: one more step of the ratio between the two values at
    that end (2e-3, 4e-3 -> 8e-3; 0.3, 1 -> 3), rounded to one significant digit like the grids' own values."""
    ordered = sorted(values)
    inner = ordered[1] if edge == ordered[0] else ordered[-2]
    return float(f"{edge * edge / inner:.0e}")


def edge_grids(base_selection: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Closing the grids (issue 21): for each core method whose selected configuration sits at an end of its grid in
    some setting, that configuration and, per such setting, the one next value outward. Scored on validation only
    (`--phase grid`): the selection stays where it is unless an outward point does better. A method selected inside
    its grid in every setting has nothing to check and is left out.

    A setting's values are those of the grid points that agree with the selection in every other setting (the line
    through it), over the base grid and the points the base regime itself ran (`grid` in its selection): so an
    `edges` regime's own selection can be closed in turn (`--base edges-default`)."""
    base_grid = grids()
    variants = {}
    for method in CORE_METHODS:
        if method not in base_selection:
            continue
        selected = dict(base_selection[method]["config"])
        candidates = [*base_grid[method], *base_selection[method].get("grid", [])]
        beyond = []
        for key, value in sorted(selected.items()):
            others = {k: v for k, v in selected.items() if k != key}
            line = [c for c in candidates if key in c and all(c.get(k) == v for k, v in others.items())]
            values = sorted({c[key] for c in line})
            if len(values) > 1 and value in (values[0], values[-1]):
                beyond.append({**selected, key: outward(values, value)})
        if beyond:
            variants[method] = [selected, *beyond]
    return variants


# Regimes built from another regime's validation selection: name -> the variants' grids.
VARIANT_REGIMES: dict[str, Callable[[Mapping[str, Any]], dict[str, list[dict[str, Any]]]]] = {
    "lambda_sweep": sweep_grids,
    "discriminators": discriminator_grids,
    "switch_points": switch_grids,
    "edges": edge_grids,
}
DEFAULT_LAMBDA = 0.1  # quality.FULL["adversarial_coef"]: the λ of grid points that do not set one


def reuse_runs(
    source: RunStore,
    target: RunStore,
    method: str,
    config: Mapping[str, Any],
    grid_seeds: Sequence[int],
    seeds: Sequence[int],
) -> int:
    """Copy `method`'s finished runs at `config` from `source` (same settings, checked by the caller) into `target`.

    The λ sweep's reference is the base regime's selected UniAPL configuration, whose runs the base regime already
    made with the same seeds, splits and settings: training them again would give the same runs at the same cost.
    Returns the number of files copied.
    """
    copied = 0
    pairs = [(source.grid_path(method, config, s), target.grid_path(method, config, s)) for s in grid_seeds]
    pairs += [(source.test_path(method, s), target.test_path(method, s)) for s in seeds]
    for origin, destination in pairs:
        if os.path.exists(origin) and not os.path.exists(destination):
            record = read_json(origin)
            if record["config"] == dict(config):
                write_json(destination, {**record, "copied_from": origin})
                copied += 1
    return copied


def method_kind(method: str) -> str:
    """The training code a method name runs: a variant regime's other names (`uniapl_lambda0.3`,
    `sft_then_grpo_switch25`) run the method they start with."""
    if method in METHODS:
        return method
    for kind in ("sft_then_agrpo", "sft_then_grpo", "uniapl"):
        if method.startswith(f"{kind}_"):
            return kind
    return method


# ---------------------------------------------------------------------------------------------------------------------
# Regimes
# ---------------------------------------------------------------------------------------------------------------------
def count_training_prompts() -> int:
    """Distinct prompts `make_splits` can draw for training rows (train topics, no held-out pair), counted exactly.

    `make_splits` redraws until a prompt is new, so asking for more training rows than this never returns.
    """
    from itertools import combinations

    from trl_uniapl.ifeval.task import HELDOUT_COMBINATIONS, INSTRUCTION_IDS, PROMPT_OPENERS, TRAIN_TOPICS, _conflicts

    total = 0
    for topic in TRAIN_TOPICS:
        for size in (1, 2, 3):
            for ids in combinations(INSTRUCTION_IDS, size):
                if _conflicts(ids, HELDOUT_COMBINATIONS):  # also the exclusive case pair, as sample_row
                    continue
                variants = 1
                for instruction_id in ids:
                    variants *= _kwarg_variants(instruction_id, topic)
                # Instruction order changes the prompt text: every ordering is a distinct prompt.
                total += variants * _factorial(size) * len(PROMPT_OPENERS)
    return total


def _factorial(n: int) -> int:
    return 1 if n <= 1 else n * _factorial(n - 1)


def _kwarg_variants(instruction_id: str, topic) -> int:
    from math import comb

    from trl_uniapl.ifeval import task as t

    if instruction_id == t.EXISTENCE:
        return len(t.EXISTENCE_KEYWORDS)
    if instruction_id == t.FORBIDDEN:
        return comb(len(topic.keywords) - 1, 1) + comb(len(topic.keywords) - 1, 2)
    if instruction_id == t.NUMBER_WORDS:
        return sum(len(v) for v in t.NUMBER_WORDS_OPTIONS.values())
    if instruction_id == t.BULLETS:
        return len(t.NUM_BULLETS_OPTIONS)
    if instruction_id == t.POSTSCRIPT:
        return len(t.POSTSCRIPT_MARKERS)
    if instruction_id == t.END_CHECKER:
        return len(t.END_PHRASES)
    return 1


REGIMES: dict[str, dict[str, Any]] = {
    # Today's setting.
    "default": {"num_demonstrations": 256, "num_preference": 512, "reward": "dense"},
    # Scarce demonstrations: half the default's demonstrations and twice its prompts, one demonstration per 8 prompts
    # (the default: one per 2), so the expert signal reaches most prompts only through what the policy learns from
    # few. 128, not fewer: at 48 no method learned in 200 steps (best 11.0% against 4.5% untrained; docs/benchmarks.md,
    # "The validation grids"), a benchmark without power.
    "scarce": {"num_demonstrations": 128, "num_preference": 1024, "reward": "dense"},
    # IFEval's all-or-nothing reward: most groups tie, GRPO alone gets little signal.
    "sparse": {"num_demonstrations": 256, "num_preference": 512, "reward": "strict"},
}


# The methods `--regime NAME` runs when `--methods` is not given: those tuned over a grid of their own in that regime.
# `uniapl_fixed_ref` shares UniAPL's grid and runs at UniAPL's selection in the `discriminators` variant regime; in the
# scarce regime so does `uniapl_no_disc` (λ 0 of the `lambda_sweep` regime). Issue 21 allows the variants to run with
# seeds only at UniAPL's selected configuration when the machine cannot hold every grid.
_OWN_GRID_METHODS = tuple(m for m in METHODS if m != "uniapl_fixed_ref")
REGIME_METHODS: dict[str, tuple[str, ...]] = {
    "default": _OWN_GRID_METHODS,
    "scarce": (*CORE_METHODS, "luffy"),
    "sparse": _OWN_GRID_METHODS,
}


def make_protocol_splits(
    seed: int, num_demonstrations: int, num_preference: int, num_validation: int, num_test: int
) -> dict[str, Any]:
    """Training splits, a validation split and a test split from the task's own `make_splits`.

    `make_splits` draws the held-out rows last, from one random stream, and never repeats a prompt across or within
    its splits. Asking it for `num_test + num_validation` held-out rows therefore gives, as the first `num_test`, the
    very rows `make_splits(num_eval=num_test)` returns (the same test split as before this protocol), and as the rest
    a validation split disjoint from it and from the training rows, drawn with the same shares of unseen topics and
    unseen instruction pairs.
    """
    splits = task.make_splits(
        seed=seed,
        num_demonstrations=num_demonstrations,
        num_preference=num_preference,
        num_eval=num_test + num_validation,
    )
    held_out = splits["eval"]
    return {
        "demonstrations": splits["demonstrations"],
        "preference": splits["preference"],
        "test": held_out.select(range(num_test)),
        "validation": held_out.select(range(num_test, num_test + num_validation)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------------------------------
def config_id(config: Mapping[str, Any]) -> str:
    """A file-name-safe, order-independent name of a configuration, e.g. `adversarial_coef=0.1,learning_rate=0.002`."""
    return ",".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in sorted(config.items())
    )


def write_json(path: str, data: Any) -> None:
    """Write atomically (a temporary file, then rename): a run killed mid-write leaves no half file behind."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(temporary, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class RunStore:
    """Where a regime's runs live; a run is finished exactly when its JSON file exists."""

    def __init__(self, root: str):
        self.root = root

    def grid_path(self, method: str, config: Mapping[str, Any], seed: int) -> str:
        return os.path.join(self.root, "runs", "grid", method, f"{config_id(config)}-seed{seed}.json")

    def test_path(self, method: str, seed: int) -> str:
        return os.path.join(self.root, "runs", "test", method, f"seed{seed}.json")

    @property
    def selection_path(self) -> str:
        return os.path.join(self.root, "selection.json")

    def write_selection(self, selection: Mapping[str, Any], grid: Mapping[str, list[dict]]) -> None:
        """Write `selection` (chosen over `grid`) to `selection.json`, keeping the recorded selection of every method
        outside `grid`: a `--methods` run of some methods (the scarce regime's variants after its core methods) adds
        to the selection instead of dropping the others'."""
        kept = {}
        if os.path.exists(self.selection_path):
            kept = {m: entry for m, entry in read_json(self.selection_path).items() if m not in grid}
        write_json(self.selection_path, {**kept, **selection})

    def recorded_student(self) -> str | None:
        """The student SHA-256 the runs here were made on (`student.sha256`; the default regime's older test phase
        recorded it as `test_student.sha256`), or None where none was recorded."""
        for name in ("student.sha256", "test_student.sha256"):
            if os.path.exists(path := os.path.join(self.root, name)):
                with open(path) as f:
                    return f.read().split()[0]
        return None

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse to mix runs made with different settings in one folder; record them on the first run."""
        path = os.path.join(self.root, "settings.json")
        if os.path.exists(path):
            saved = read_json(path)
            if saved != json.loads(json.dumps(settings, default=float)):
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.root} holds runs made with other settings (differ in {changed}); use another "
                    f"--output_dir or the same settings."
                )
        else:
            write_json(path, settings)


def select(grid_runs: Mapping[str, Mapping[str, list[dict[str, Any]]]], grid: Mapping[str, list[dict]]) -> dict:
    """Each method's best configuration by mean validation `SELECTION_METRIC` over its grid seeds.

    Takes only the grid runs (validation records): test records cannot influence it. A method is selected only when
    every point of its grid has all its grid seeds; ties go to the earlier grid point. A method with a single
    configuration (a variant regime's) has nothing to choose: it is selected without validation runs
    (`validation_score` None where it has none).
    """
    selection = {}
    for method, configs in grid.items():
        if len(configs) == 1 and not grid_runs.get(method, {}).get(config_id(configs[0])):
            selection[method] = {"config": configs[0], "config_id": config_id(configs[0]), "validation_score": None,
                                 "scores": {}, "single_configuration": True}  # fmt: skip
            continue
        scores = []
        for config in configs:
            records = grid_runs.get(method, {}).get(config_id(config), [])
            if not records:
                break
            if any(record["split"] != "validation" for record in records):
                raise ValueError(f"Grid run of {method} {config_id(config)} was not scored on validation.")
            scores.append(float(np.mean([record["metrics"][SELECTION_METRIC] for record in records])))
        else:
            best = int(np.argmax(scores))
            selection[method] = {
                "config": configs[best],
                "config_id": config_id(configs[best]),
                "validation_score": scores[best],
                "scores": dict(zip(map(config_id, configs), scores)),
                "grid": [dict(c) for c in configs],
            }
    return selection


def load_grid_runs(store: RunStore, grid: Mapping[str, list[dict]], grid_seeds: Sequence[int]) -> dict:
    runs: dict[str, dict[str, list]] = {}
    for method, configs in grid.items():
        for config in configs:
            records = [read_json(p) for s in grid_seeds if os.path.exists(p := store.grid_path(method, config, s))]
            if len(records) == len(grid_seeds):
                runs.setdefault(method, {})[config_id(config)] = records
    return runs


def finished(store: RunStore, grid: Mapping[str, list[dict]], grid_seeds: Sequence[int], seeds: Sequence[int]) -> bool:
    """Whether every run of `grid` is on disk: each point of a method with several configurations, and each test seed
    at the configuration its grid runs select (a regime completed on another machine: nothing left to train)."""
    runs = load_grid_runs(store, grid, grid_seeds)
    if any(len(configs) > 1 and len(runs.get(method, {})) < len(configs) for method, configs in grid.items()):
        return False
    selection = select(runs, grid)
    return all(
        os.path.exists(path := store.test_path(method, seed))
        and read_json(path).get("config") == selection[method]["config"]
        for method in grid
        for seed in seeds
    )


def claimer(directory: str) -> Callable[[str], bool]:
    """`run_protocol(claim=...)` for processes that share `directory` (one per phase of one `--jobs` command): a run
    goes to the first process that claims it, by creating its claim file atomically (O_EXCL)."""

    def claim(path: str) -> bool:
        name = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()
        try:
            os.close(os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    return claim


TrainAndEvaluate = Callable[[str, dict[str, Any], int, str], dict[str, Any]]


def run_protocol(
    store: RunStore,
    grid: Mapping[str, list[dict]],
    train_and_evaluate: TrainAndEvaluate,
    grid_seeds: Sequence[int],
    seeds: Sequence[int],
    phase: str = "all",
    log: Callable[[str], None] = print,
    shard: tuple[int, int] = (0, 1),
    claim: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Grid on validation for every method, selection, then `seeds` on test at each selected configuration.

    Every finished run is written at once; a rerun skips what exists. `phase="grid"` stops after the selection,
    `phase="test"` skips the grid (its runs must be on disk). `shard=(i, n)` runs only every n-th run of each phase,
    starting at the i-th: n processes with the n shards of one phase do every run of it once. With `claim` (what
    `quality.py --jobs` passes, see `claimer`) the processes share the phase's runs still to do as a queue instead:
    each takes the next unclaimed one, so none idles while another has runs left (finished runs, and runs of very
    different lengths, unbalance a fixed split). `train_and_evaluate(method, config, seed, split)` returns a
    JSON-able record with at least `metrics`.
    """
    index, count = shard

    def mine(number: int, path: str) -> bool:
        return claim(path) if claim is not None else number % count == index

    # A method with one configuration has nothing to select: no validation runs (`select`).
    grid_runs = [(m, c, s) for m, configs in grid.items() if len(configs) > 1 for c in configs for s in grid_seeds]
    finished = sum(os.path.exists(store.grid_path(*run)) for run in grid_runs)
    tests = sum(os.path.exists(store.test_path(m, s)) for m in grid for s in seeds)
    log(
        f"{store.root}: {finished}/{len(grid_runs)} grid runs and {tests}/{len(grid) * len(seeds)} test runs already "
        f"finished"
    )
    if phase != "test":
        for number, (method, config, seed) in enumerate(grid_runs):
            path = store.grid_path(method, config, seed)
            if os.path.exists(path) or not mine(number, path):
                continue
            log(f"grid {number + 1}/{len(grid_runs)}: {method} {config_id(config)} seed {seed} (validation)")
            record = train_and_evaluate(method, dict(config), seed, "validation")
            write_json(path, {**record, "method": method, "config": config, "seed": seed, "split": "validation"})
    selection = select(load_grid_runs(store, grid, grid_seeds), grid)
    if (count == 1 and claim is None) or phase == "test":  # a grid shard sees the others' runs once all finished
        store.write_selection(selection, grid)
    if phase == "grid":
        return selection
    # Seed by seed: a test phase stopped part-way leaves every method at the same finished seeds (paired).
    test_runs = [(m, s) for s in seeds for m in grid]
    for number, (method, seed) in enumerate(test_runs):
        if claim is None and number % count != index:
            continue
        if method not in selection:  # only when a grid run failed to appear: never fall back to another choice
            log(f"{method}: grid incomplete, no test run for seed {seed}")
            continue
        path = store.test_path(method, seed)
        config = selection[method]["config"]
        if os.path.exists(path):
            record = read_json(path)
            if record.get("config", config) == config:
                continue
            if "copied_from" not in record:  # a run trained here at another configuration: never overwritten
                raise ValueError(
                    f"{path} was trained at {config_id(record['config'])}, but the selection is now "
                    f"{config_id(config)}; move the file away (or use another --output_dir) to run the new selection."
                )
            log(f"test: {method} seed {seed}: the run copied from {record['copied_from']} is at another configuration")
        if claim is not None and not claim(path):
            continue
        log(f"test: {method} {config_id(config)} seed {seed}")
        record = train_and_evaluate(method, dict(config), seed, "test")
        write_json(path, {**record, "method": method, "config": config, "seed": seed, "split": "test"})
    return selection


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
# The evidence for why the discriminator does or does not help: tied groups (no GRPO gradient), how well the
# discriminator separates expert from policy, the adversarial reward and the λ applied.
SIGNALS = (
    "reward",
    "frac_reward_zero_std",
    "entropy",
    "discriminator/acc_real",
    "discriminator/acc_fake",
    "adversarial/reward_mean",
    "adversarial/coef",
)
# Measured once after training (quality.evaluate): the mean per-token KL from the starting policy along the policy's
# own held-out responses (GRPO at β = 0 logs no KL during training), and the distinct bigrams of those responses
# (runs made before it was added lack it: "–").
EVAL_SIGNALS = ("kl_to_start", "distinct_2")


def training_signals(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over the logged steps, then over seeds, of each training signal the runs logged (and the mean over seeds
    of each of EVAL_SIGNALS the runs measured)."""
    out = {}
    for key in SIGNALS:
        per_run = [np.mean(values) for r in records if (values := [h[key] for h in r.get("history", []) if key in h])]
        if per_run:
            out[key] = float(np.mean(per_run))
    for key in EVAL_SIGNALS:
        if values := [r["metrics"][key] for r in records if r["metrics"].get(key) is not None]:
            out[key] = float(np.mean(values))
    return out


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Each training signal per logged step, averaged over the seeds that logged it: `{signal: {"step", "mean"}}`."""
    out = {}
    for key in SIGNALS:
        by_step: dict[float, list[float]] = {}
        for record in records:
            for row in record.get("history", []):
                if key in row:
                    by_step.setdefault(row["step"], []).append(row[key])
        if by_step:
            steps = sorted(by_step)
            out[key] = {"step": steps, "mean": [float(np.mean(by_step[step])) for step in steps]}
    return out


def _mean_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over seeds of each report metric the records have."""
    keys = [k for k in REPORT_METRICS if all(r["metrics"].get(k) is not None for r in records)]
    return {k: float(np.mean([r["metrics"][k] for r in records])) for k in keys}


def report(
    store: RunStore,
    grid: Mapping[str, list[dict]],
    grid_seeds: Sequence[int],
    seeds: Sequence[int],
    extra: Mapping[str, Any] | None = None,
    num_bootstrap: int = 1000,
) -> dict[str, Any]:
    """`quality.json` and `quality.md` from whatever runs are on disk; missing runs are listed, not guessed."""
    grid_record = {}
    for method, configs in grid.items():
        grid_record[method] = []
        for config in configs:
            records = [read_json(p) for s in grid_seeds if os.path.exists(p := store.grid_path(method, config, s))]
            grid_record[method].append(
                {
                    "config": config,
                    "config_id": config_id(config),
                    "finished_seeds": [r["seed"] for r in records],
                    "validation": _mean_metrics(records) if records else None,
                    "train_seconds": float(np.mean([r["train_seconds"] for r in records])) if records else None,
                    "samples": records[0].get("budget", {}).get("samples") if records else None,
                }
            )
    selection = select(load_grid_runs(store, grid, grid_seeds), grid)
    superseded = superseded_grid_runs(store, grid)
    test_runs = {
        method: {s: read_json(p) for s in seeds if os.path.exists(p := store.test_path(method, s))} for method in grid
    }
    results = {}
    reference = test_runs.get(REFERENCE_METHOD, {})
    for method, runs in test_runs.items():
        entry: dict[str, Any] = {"finished_seeds": sorted(runs), "missing_seeds": [s for s in seeds if s not in runs]}
        if runs:
            ordered = [runs[s] for s in sorted(runs)]
            entry["config"] = ordered[0]["config"]
            entry["test"] = bootstrap([r["per_prompt"] for r in ordered], num_samples=num_bootstrap)
            entry["budget"] = ordered[0].get("budget")
            entry["train_seconds"] = float(np.mean([r["train_seconds"] for r in ordered]))
            entry["training_signals"] = training_signals(ordered)
            entry["training_curves"] = training_curves(ordered)
            paired = sorted(set(runs) & set(reference))
            if method != REFERENCE_METHOD and paired:
                entry["minus_reference"] = bootstrap(
                    [runs[s]["per_prompt"] for s in paired],
                    baseline=[reference[s]["per_prompt"] for s in paired],
                    num_samples=num_bootstrap,
                )
                entry["paired_seeds"] = paired
        results[method] = entry
    out = {
        "grid": grid_record,
        "superseded_grid": superseded,
        "selection": selection,
        "results": results,
        "seeds": list(seeds),
        "grid_seeds": list(grid_seeds),
        "reference_method": REFERENCE_METHOD,
        **(extra or {}),
    }
    out["complete"] = all(not e["missing_seeds"] for e in results.values()) and set(selection) == set(grid)
    out["plots"] = plot(out, store.root)
    write_json(os.path.join(store.root, "quality.json"), out)
    with open(os.path.join(store.root, "quality.md"), "w") as f:
        f.write(markdown(out))
    return out


def superseded_grid_runs(store: RunStore, grid: Mapping[str, list[dict]]) -> list[dict[str, Any]]:
    """Validation runs on disk at configurations no longer in `grid` (an earlier grid's points): reported, so that the
    tuning record shows every configuration that was tried, but never selected."""
    current = {method: {config_id(c) for c in configs} for method, configs in grid.items()}
    found = []
    for method in grid:
        folder = os.path.dirname(store.grid_path(method, {}, 0))
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            # A run's file is named `<config_id>-seed<k>.json`: the current grid's runs are skipped unread.
            if not name.endswith(".json") or name.rsplit("-seed", 1)[0] in current[method]:
                continue
            record = read_json(os.path.join(folder, name))
            metrics = record["metrics"]
            found.append(
                {
                    "method": method,
                    "config_id": config_id(record["config"]),
                    "seed": record["seed"],
                    "validation": {
                        key: metrics.get(key) for key in ("prompt_level_strict_acc", "inst_level_strict_acc")
                    },
                    "train_seconds": record.get("train_seconds"),
                }
            )
    return found


def plot(out: Mapping[str, Any], directory: str) -> list[str]:
    """Test accuracy per method, paired differences against the reference, and accuracy against the measured train
    seconds per run (the cost side), with their intervals (needs matplotlib, the `plots` extra; without it the report
    has no figure and says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    methods = [m for m, e in out["results"].items() if "test" in e]
    if not methods:
        return []

    def percent_intervals(key: str, shown: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Means and (below, above) error bars, in percent, of `shown`'s prompt-level strict accuracy under `key`."""
        stats = [out["results"][m][key]["prompt_level_strict_acc"] for m in shown]
        means = np.array([s["mean"] for s in stats]) * 100
        errors = np.array([[s["mean"] - s["low"], s["high"] - s["mean"]] for s in stats]).reshape(-1, 2).T * 100
        return means, errors

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, key, title in (
        (axes[0], "test", "test prompt-level strict acc (%)"),
        (axes[1], "minus_reference", f"minus {out['reference_method']} (points, paired)"),
    ):
        shown = [m for m in methods if key in out["results"][m]]
        means, errors = percent_intervals(key, shown)
        ax.bar(range(len(shown)), means, yerr=errors if len(shown) else None, capsize=4, alpha=0.7)
        ax.set_xticks(range(len(shown)), shown, rotation=25, fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(title + ", 95% CI", fontsize=9)
    timed = [m for m in methods if out["results"][m].get("train_seconds")]
    seconds = [out["results"][m]["train_seconds"] for m in timed]
    means, errors = percent_intervals("test", timed)
    cost_ax = axes[2]
    for i, method in enumerate(timed):  # one call per point: each method gets its own colour
        cost_ax.errorbar(seconds[i], means[i], yerr=errors[:, i : i + 1], fmt="o", capsize=3)
        cost_ax.annotate(method, (seconds[i], means[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    cost_ax.set_xlabel("measured train seconds per run (mean over seeds)", fontsize=8)
    cost_ax.set_ylabel("test prompt-level strict acc (%)", fontsize=8)
    cost_ax.set_title("accuracy against cost, 95% CI", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, "quality_accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path), *plot_training_curves(out, directory, plt)]


SMOOTHING = 5  # steps per moving average in the training-curve figure: one step's value averages only 4-5 groups


def _smoothed(curve: Mapping[str, list[float]]) -> tuple[list[float], np.ndarray]:
    """The curve's moving average over SMOOTHING logged steps (shorter curves are shown as they are)."""
    window = min(SMOOTHING, len(curve["mean"]))
    means = np.convolve(curve["mean"], np.ones(window) / window, mode="valid")
    return curve["step"][window - 1 :], means


def plot_training_curves(out: Mapping[str, Any], directory: str, plt) -> list[str]:
    """The training signals over the steps of the test runs, one line per method (mean over seeds): the evidence for
    why the discriminator helps or does not (tied groups, how well it separates expert from policy, r_adv, λ)."""
    curves = {m: e["training_curves"] for m, e in out["results"].items() if e.get("training_curves")}
    panels = [
        ("reward", "task reward (mean)"),
        ("frac_reward_zero_std", "frac_reward_zero_std (tied groups)"),
        ("entropy", "policy entropy"),
        ("discriminator/acc_real", "discriminator acc: expert (solid), policy (dashed)"),
        ("adversarial/reward_mean", "r_adv (mean adversarial reward)"),
        ("adversarial/coef", "applied λ (adversarial/coef)"),
    ]
    if not any(key in c for c in curves.values() for key, _ in panels):
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for index, (method, method_curves) in enumerate(curves.items()):
            color = f"C{index}"
            if key in method_curves:
                ax.plot(*_smoothed(method_curves[key]), color=color, label=method)
            if key == "discriminator/acc_real" and "discriminator/acc_fake" in method_curves:
                ax.plot(*_smoothed(method_curves["discriminator/acc_fake"]), color=color, ls="--")
        ax.set_title(title + f", {SMOOTHING}-step mean", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(directory, "quality_signals.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def format_interval(stat: Mapping[str, float] | None, scale: float, digits: int) -> str:
    """`mean [low, high]` of a bootstrap statistic, scaled (100 for %), or `–` when there is none."""
    if not stat:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} [{stat['low'] * scale:.{digits}f}, {stat['high'] * scale:.{digits}f}]"


COLUMNS = (
    ("prompt_level_strict_acc", "prompt strict %", 100, 1),
    ("inst_level_strict_acc", "inst strict %", 100, 1),
    ("topic_accuracy", "topic %", 100, 1),
    ("unrequested_effect_rate_mean", "unrequested effects %", 100, 1),
    ("length_wasserstein_to_expert", "length W1", 1, 2),
    ("expert_logp", "expert log-prob", 1, 3),
)


def markdown(out: Mapping[str, Any]) -> str:
    seeds = out["seeds"]
    header = "| method | seeds | " + " | ".join(c[1] for c in COLUMNS)
    lines = [f"# Quality: regime `{out.get('regime', '?')}`", ""]
    if not out["complete"]:
        lines += ["**Incomplete**: cells marked *pending* have runs still to do (rerun the same command).", ""]
    lines += [
        f"## Test split ({len(seeds)} seeds at each selected configuration; mean [95% bootstrap CI over seeds and "
        "prompts])",
        "",
        header + " | samples | train s/run |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    for method, entry in out["results"].items():
        n = f"{len(entry['finished_seeds'])}/{len(seeds)}"
        if "test" not in entry:
            lines.append(f"| {method} | {n} | " + " | ".join("*pending*" for _ in COLUMNS) + " | – | – |")
            continue
        cells = [format_interval(entry["test"].get(key), scale, digits) for key, _, scale, digits in COLUMNS]
        samples = (entry.get("budget") or {}).get("samples", "–")
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + f" | {samples} | {entry['train_seconds']:.0f} |")
    if out.get("reference"):
        test = out["reference"]["test"]
        lines += [
            "",
            f"References on the test split: untrained student {test['student']['prompt_level_strict_acc'] * 100:.1f}% "
            f"prompt strict, one constant reply {test['constant_reply']['prompt_level_strict_acc'] * 100:.1f}%.",
        ]
    reference = out["reference_method"]
    lines += [
        "",
        f"## Paired differences against {reference} (method − {reference}, same seeds and prompts)",
        "",
        "| method | paired seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for method, entry in out["results"].items():
        if method == reference:
            continue
        if "minus_reference" not in entry:
            lines.append(f"| {method} | – | " + " | ".join("*pending*" for _ in COLUMNS) + " |")
            continue
        cells = [
            format_interval(entry["minus_reference"].get(key), scale, digits) for key, _, scale, digits in COLUMNS
        ]
        lines.append(f"| {method} | {entry['paired_seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Training signals (test runs; mean over logged steps, then seeds; `kl_to_start`, `distinct_2`: after "
        "training, on the held-out responses)",
        "",
        "| method | " + " | ".join((*SIGNALS, *EVAL_SIGNALS)) + " |",
        "|" + "---|" * (len(SIGNALS) + len(EVAL_SIGNALS) + 1),
    ]
    for method, entry in out["results"].items():
        signals = entry.get("training_signals", {})
        cells = [f"{signals[k]:.3f}" if k in signals else "–" for k in (*SIGNALS, *EVAL_SIGNALS)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "quality_signals.png" in out.get("plots", []):
        lines += ["", "Per step, mean over the test seeds: `quality_signals.png`.", "", "![](quality_signals.png)"]
    lines += [
        "",
        f"## Tuning record (validation split, grid seeds {out['grid_seeds']}; selected in **bold**)",
        "",
        "| method | configuration | validation prompt strict % | inst strict % | train s | samples |",
        "|---|---|---|---|---|---|",
    ]
    for method, points in out["grid"].items():
        chosen = out["selection"].get(method, {}).get("config_id")
        for point in points:
            name = f"**{point['config_id']}**" if point["config_id"] == chosen else point["config_id"]
            if point["validation"] is None:
                untuned = out["selection"].get(method, {}).get("single_configuration")
                cell = "– (one configuration, not tuned)" if untuned else "*pending*"
                lines.append(f"| {method} | {name} | {cell} | {cell} | – | – |")
                continue
            v = {
                key: f"{point['validation'][key] * 100:.1f}" if key in point["validation"] else "–"
                for key in ("prompt_level_strict_acc", "inst_level_strict_acc")
            }
            lines.append(
                f"| {method} | {name} | {v['prompt_level_strict_acc']} | {v['inst_level_strict_acc']} | "
                f"{point['train_seconds']:.0f} | {point['samples']} |"
            )
    if out.get("superseded_grid"):
        lines += [
            "",
            "## Superseded grid points (an earlier grid, validation split; never selected)",
            "",
            "| method | configuration | seed | validation prompt strict % | inst strict % |",
            "|---|---|---|---|---|",
        ]
        for point in out["superseded_grid"]:
            v = point["validation"]
            lines.append(
                f"| {point['method']} | {point['config_id']} | {point['seed']} | "
                f"{v['prompt_level_strict_acc'] * 100:.1f} | {v['inst_level_strict_acc'] * 100:.1f} |"
            )
    return "\n".join(lines) + "\n"
