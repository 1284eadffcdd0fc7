"""Property-based tests (hypothesis): malformed rows and configs give a clear ValueError before training starts (and
before the model is loaded), naming the dataset, the row and the field; valid data is merged with nothing dropped."""

import re

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_uniapl import UniAPLConfig, UniAPLTrainer
from trl_uniapl.streams import merge_streams, validate_row

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NOT_A_MODEL = "/nonexistent/uniapl-model"  # reached only if validation wrongly lets the data through

TEXT = st.text(alphabet="abcdefghij klmno", min_size=1, max_size=12).filter(lambda t: t.strip())


def as_field(text, fmt: str, role: str):
    return text if fmt == "standard" else [{"role": role, "content": text}]


# (fault, which dataset, formats it applies to, expected message pattern with {name} and {row} placeholders)
FAULTS = {
    "prompt_none": ("either", None, r"{name} row {row} has no `prompt`"),
    "prompt_blank": ("either", None, r"{name} row {row}, field `prompt` is empty"),
    "prompt_empty_messages": ("either", "conversational", r"{name} row {row}, field `prompt` is an empty list"),
    "content_not_string": ("either", "conversational", r"{name} row {row}, field `prompt`: message content must be"),
    "prompt_int_column": ("either", None, r"{name} row 0, field `prompt`: expected a string"),
    "no_prompt_column": ("either", None, r"{name} has no `prompt` column"),
    "completion_blank": ("demonstration_dataset", None, r"{name} row {row}, field `completion` is empty"),
    "completion_none": ("demonstration_dataset", None, r"{name} row {row} has no `completion`"),
    "no_completion_column": ("demonstration_dataset", None, r"demonstration_dataset has no `completion` column"),
    "completion_other_format": ("demonstration_dataset", None, r"{name} row {row} mixes a \w+ `prompt` with a"),
    "mixed_streams": ("both", None, r"Standard rows .* mixed with conversational rows"),
}


@st.composite
def streams_with_fault(draw):
    fault = draw(st.sampled_from(sorted(FAULTS) + ["valid"]))
    target, only_format, pattern = FAULTS.get(fault, ("either", None, None))
    fmt = only_format or draw(st.sampled_from(["standard", "conversational"]))
    num_train, num_demo = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    train = {"prompt": [as_field(draw(TEXT), fmt, "user") for _ in range(num_train)]}
    demo = {
        "prompt": [as_field(draw(TEXT), fmt, "user") for _ in range(num_demo)],
        "completion": [as_field(draw(TEXT), fmt, "assistant") for _ in range(num_demo)],
    }
    if target == "either":
        target = draw(st.sampled_from(["train_dataset", "demonstration_dataset"]))
    columns = train if target == "train_dataset" else demo
    row = draw(st.integers(0, len(columns["prompt"]) - 1))
    if fault == "prompt_none":
        columns["prompt"][row] = None
    elif fault == "prompt_blank":
        columns["prompt"][row] = as_field(draw(st.sampled_from(["", " ", "\n\t"])), fmt, "user")
    elif fault == "prompt_empty_messages":
        columns["prompt"][row] = []
    elif fault == "content_not_string":
        columns["prompt"] = [[{"role": "user", "content": None if i == row else m[0]["content"]}] for i, m in
                             enumerate(columns["prompt"])]  # fmt: skip
    elif fault == "prompt_int_column":
        columns["prompt"] = list(range(len(columns["prompt"])))
    elif fault == "no_prompt_column":
        columns["question"] = columns.pop("prompt")
    elif fault == "completion_blank":
        columns["completion"][row] = as_field("  ", fmt, "assistant")
    elif fault == "completion_none":
        columns["completion"][row] = None
    elif fault == "no_completion_column":
        columns["answer"] = columns.pop("completion")
    elif fault == "completion_other_format":
        other = "conversational" if fmt == "standard" else "standard"
        columns["completion"] = [as_field(draw(TEXT), other, "assistant") for _ in columns["completion"]]
        row = 0
    elif fault == "mixed_streams":
        demo["prompt"] = [as_field(draw(TEXT), "standard", "user") for _ in range(num_demo)]
        demo["completion"] = [as_field(draw(TEXT), "standard", "assistant") for _ in range(num_demo)]
        train["prompt"] = [as_field(draw(TEXT), "conversational", "user") for _ in range(num_train)]
    expected = None if pattern is None else pattern.format(name=target, row=row)
    return fault, Dataset.from_dict(train), Dataset.from_dict(demo), expected


@FAST
@given(streams_with_fault())
def test_malformed_streams_fail_clearly(case):
    fault, train, demo, expected = case
    if expected is None:
        streams = merge_streams(train, demo)
        # Nothing dropped: every row is counted in exactly one stream.
        assert len(streams.preference_indices) == len(train)
        assert len(streams.demonstration_indices) == len(demo)
        assert len(streams.dataset) == len(train) + len(demo)
        return
    with pytest.raises(ValueError, match=expected):
        merge_streams(train, demo)


@settings(max_examples=8, deadline=None)
@given(streams_with_fault().filter(lambda case: case[3] is not None))
def test_trainer_rejects_malformed_data_before_loading_the_model(case):
    """The trainer validates the streams first: the (nonexistent) model is never loaded."""
    fault, train, demo, expected = case
    with pytest.raises(ValueError, match=expected):
        UniAPLTrainer(model=NOT_A_MODEL, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=UniAPLConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none"),
                      train_dataset=train, demonstration_dataset=demo)  # fmt: skip


JUNK = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=2),
    st.fixed_dictionaries({"role": st.text(max_size=3)}),
    st.lists(
        st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.integers(), st.none())}),
        min_size=1,
        max_size=2,
    ),  # fmt: skip
)


@settings(max_examples=30, deadline=None)
@given(prompt=JUNK, completion=JUNK, demonstration=st.booleans(), index=st.integers(0, 99))
def test_validate_row_on_arbitrary_values(prompt, completion, demonstration, index):
    """Rows checked batch by batch (streaming datasets): any value is accepted as a format or rejected with a
    ValueError naming the row; never another exception."""
    row = {"prompt": prompt, "completion": completion}
    try:
        fmt = validate_row(row, "train batch", index, demonstration=demonstration)
    except ValueError as error:
        assert f"train batch row {index}" in str(error)
        assert re.search(r"`(prompt|completion)`|content|message", str(error))
        return
    assert fmt in ("standard", "conversational")
    assert isinstance(prompt, (str, list)) and prompt
    if demonstration:
        assert isinstance(completion, type(prompt))


CONFIG_FIELDS = {
    "demonstration_ratio": st.one_of(st.none(), st.floats(-2, 3, allow_nan=False)),
    "sft_coef": st.floats(-1, 2, allow_nan=False),
    "adversarial_coef": st.floats(-1, 2, allow_nan=False),
    "adversarial_reward": st.sampled_from(["gail", "airl", "logd", "wgan", ""]),
    "discriminator_loss": st.sampled_from(["bce", "bt", "hinge"]),
    "discriminator_steps": st.integers(-1, 3),
    "discriminator_label_smoothing": st.floats(-0.2, 0.8, allow_nan=False),
    "per_device_train_batch_size": st.integers(1, 9),
    "num_generations": st.integers(1, 9),
}


@settings(max_examples=30, deadline=None)
@given(st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
def test_config_validation(overrides):
    """Every invalid combination is a ValueError naming the field at construction time; valid ones construct."""
    kwargs = dict(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none")
    kwargs.update(overrides)
    ratio = overrides.get("demonstration_ratio")
    batch, generations = overrides.get("per_device_train_batch_size", 8), overrides.get("num_generations", 8)
    invalid = {
        "demonstration_ratio": ratio is not None
        and not 0 <= ratio <= 1
        # No demonstration prompt is rolled out: a Bradley-Terry discriminator has no pairs of one prompt.
        or (ratio == 0 and overrides.get("adversarial_coef", 0.1) > 0 and overrides.get("discriminator_loss") == "bt"),
        "sft_coef": overrides.get("sft_coef", 1.0) < 0,
        "adversarial_coef": overrides.get("adversarial_coef", 0.1) < 0,
        "adversarial_reward": overrides.get("adversarial_reward", "gail") not in ("gail", "airl", "logd")
        # The log-odds rewards need a BCE discriminator: a Bradley-Terry logit has an arbitrary offset.
        or (
            overrides.get("discriminator_loss") == "bt"
            and overrides.get("adversarial_reward") in ("gail", "airl", "logd")
        ),
        "discriminator_loss": overrides.get("discriminator_loss", "bce") not in ("bce", "bt"),
        "discriminator_steps": overrides.get("discriminator_steps", 1) < 1,
        "discriminator_label_smoothing": not 0 <= overrides.get("discriminator_label_smoothing", 0.0) < 0.5,
        "num_generations": generations < 2 or batch % generations != 0,
    }
    bad = [name for name, is_bad in invalid.items() if is_bad]
    if not bad:
        config = UniAPLConfig(**kwargs)
        assert config.generation_batch_size % config.num_generations == 0
        return
    with pytest.raises(ValueError) as error:
        UniAPLConfig(**kwargs)
    message = str(error.value)
    # GRPOConfig checks its own fields first, then UniAPLConfig its own: the message names one of the bad fields.
    aliases = {"num_generations": ("num_generations", "generations per prompt")}
    assert any(alias in message for name in bad for alias in aliases.get(name, (name,))), (bad, message)


@pytest.mark.parametrize(
    "ratio, with_demos, adversarial, extra, pattern",
    [
        (0.5, False, 0.0, {}, r"`demonstration_ratio=0.5` but no demonstrations"),
        # Rolled out never and read by no SFT batch: the demonstrations would never be used.
        (0.0, True, 0.1, {"sft_coef": 0.0, "sft_warmup_steps": 0}, r"`demonstration_ratio=0` but \d+ demonstrations"),
        (
            0.0,
            True,
            0.0,
            {"sft_per_device_train_batch_size": None, "sft_warmup_steps": 0},
            r"`demonstration_ratio=0` but \d+ demonstrations",
        ),  # fmt: skip
        (None, False, 0.1, {}, r"`adversarial_coef=0.1`.*needs expert demonstrations"),
    ],
)
def test_ratio_and_streams_disagree(ratio, with_demos, adversarial, extra, pattern):
    train = Dataset.from_dict({"prompt": ["a b", "c d"]})
    demo = Dataset.from_dict({"prompt": ["e f"], "completion": ["g h"]}) if with_demos else None
    args = UniAPLConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none",
                        demonstration_ratio=ratio, adversarial_coef=adversarial, **extra)  # fmt: skip
    with pytest.raises(ValueError, match=pattern):
        UniAPLTrainer(model=NOT_A_MODEL, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                      train_dataset=train, demonstration_dataset=demo)  # fmt: skip
