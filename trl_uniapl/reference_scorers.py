"""Fixed, reference-conditioned scorers: the paper's published discriminator, as standalone components.

The UniAPL paper's discriminator is *fixed*, not co-trained (ICLR 2026 reviews of arXiv 2509.25148; its v2 abstract:
"a fixed lightweight discriminator" comparing policy rollouts with offline expert responses). It is a modified POLAR
reward model (arXiv 2507.05197): a model that scores a candidate answer by its consistency with a *reference* answer
to the same prompt. This module holds such scorers; a trainer calls one on the rows of demonstration prompts, each row
carrying that prompt's expert completion as its reference, and turns the scores into a group-relative advantage.

Calling convention (the [`ReferenceScorer`] protocol):

```python
scores = scorer(prompts, references, completions, **kwargs)  # list[float], one per row
```

`prompts`, `references` and `completions` are lists of equal length in TRL's formats: plain strings, or
conversational lists of `{"role", "content"}` messages (a completion or reference is `[{"role": "assistant",
"content": ...}]`). Row `i` is scored as `completions[i]` against `references[i]` for `prompts[i]`. `kwargs` may carry
other dataset columns (as TRL passes to reward functions); a scorer ignores what it does not use. Higher is more
consistent with the reference; the scale is the scorer's own (F1 in [0, 1], a model's raw logit).

Scorers:

- [`ngram_f1`] / [`ngram_f1_scorer`]: character (or word) n-gram F1 against the reference; no model, no download.
- [`SequenceClassifierScorer`]: a frozen `AutoModelForSequenceClassification` (`num_labels=1`) reading a text
  template of prompt, reference and completion; a POLAR-style checkpoint, or the small one
  [`trl_uniapl.demo.reference_scorer.build_reference_scorer`] trains for the embedded task.
- any callable following the convention, e.g. given as a dotted import path to [`load_reference_scorer`].

[`describe_scorer`] returns a JSON-ready record of which scorer was used, for checkpoints and reports.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REFERENCE_TEMPLATE",
    "NGramF1Scorer",
    "ReferenceScorer",
    "SequenceClassifierScorer",
    "TEMPLATE_FIELDS",
    "describe_scorer",
    "is_model_spec",
    "load_reference_scorer",
    "message_text",
    "ngram_f1",
    "ngram_f1_score",
    "ngram_f1_scorer",
]

TEMPLATE_FIELDS: tuple[str, ...] = ("prompt", "reference", "completion")
"""The fields every scorer template must contain, each exactly as `{prompt}`, `{reference}`, `{completion}`."""

DEFAULT_REFERENCE_TEMPLATE = "Prompt:\n{prompt}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{completion}"
"""Default text layout of [`SequenceClassifierScorer`]: the candidate comes last, so that left truncation drops the
start of the prompt first and never the candidate."""


@runtime_checkable
class ReferenceScorer(Protocol):
    """What a reference-conditioned scorer is: a callable returning one float per row.

    Args:
        prompts (`list`): prompts, strings or lists of `{"role", "content"}` messages.
        references (`list`): each row's reference (expert) completion, same formats.
        completions (`list`): the candidate completions to score, same formats.
        **kwargs: other columns of the rows, ignored unless the scorer uses them.

    Returns:
        `list[float]`: one score per row, higher meaning more consistent with the row's reference.
    """

    def __call__(self, prompts: list, references: list, completions: list, **kwargs: Any) -> list[float]: ...


def message_text(value: str | Sequence[dict[str, Any]] | None) -> str:
    """Plain text of a prompt, reference or completion in either of TRL's formats.

    A string is returned as is. A list of `{"role", "content"}` messages gives the contents of all messages joined by
    `"\\n"` (roles dropped; this is also how POLAR joins messages); a content given as a list of parts (multimodal
    format) contributes the `"text"` of its text parts. `None` gives `""`.

    (The IFEval helpers `trl_uniapl.ifeval.rewards.prompt_text` / `completion_text` keep only the last (user) message
    and need the `ifeval` extra, so they are not reused here: a scorer must see a multi-turn prompt whole, and this
    module must import without lm-eval.)

    Args:
        value (`str`, `list[dict]` or `None`): the prompt, reference or completion.

    Returns:
        `str`: its text.

    Raises:
        `ValueError`: if `value` is neither a string nor a list of messages.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, Sequence):
        raise ValueError(
            f"Expected a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}: {value!r:.80}"
        )
    texts = []
    for message in value:
        if not isinstance(message, dict) or "content" not in message:
            raise ValueError(
                f"Expected a list of {{'role', 'content'}} messages, got an item {type(message).__name__}: "
                f"{message!r:.80}"
            )
        content = message["content"]
        if content is None:
            texts.append("")
        elif isinstance(content, str):
            texts.append(content)
        else:
            texts.append("".join(part.get("text", "") for part in content if isinstance(part, dict)))
    return "\n".join(texts)


def _check_rows(prompts: Sequence, references: Sequence, completions: Sequence) -> None:
    if not (len(prompts) == len(references) == len(completions)):
        raise ValueError(
            f"A reference scorer needs one prompt, one reference and one completion per row; got {len(prompts)} "
            f"prompts, {len(references)} references and {len(completions)} completions."
        )


# --------------------------------------------------------------------------------------------------------------------
# n-gram F1
# --------------------------------------------------------------------------------------------------------------------


def _ngrams(text: str, n: int, level: str) -> Counter:
    units: Sequence[str] = text if level == "char" else text.split()
    return Counter(tuple(units[i : i + n]) for i in range(len(units) - n + 1))


def ngram_f1_score(candidate: str, reference: str, n: int = 3, level: str = "char") -> float:
    """F1 of the multiset overlap between the n-grams of `candidate` and of `reference`.

    With `overlap = Σ_g min(count_candidate(g), count_reference(g))`: precision = overlap / (candidate n-grams),
    recall = overlap / (reference n-grams), F1 = 2PR / (P + R). 0.0 when either text has no n-gram (shorter than `n`
    characters or words, or empty), even if both are equal; 1.0 for equal texts of at least `n` units.

    Args:
        candidate (`str`): the text to score.
        reference (`str`): the reference text.
        n (`int`, *optional*, defaults to `3`): n-gram length.
        level (`str`, *optional*, defaults to `"char"`): `"char"` (n-grams of characters of the raw text, case,
            punctuation and whitespace included) or `"word"` (n-grams of whitespace-separated words,
            `str.split()`, punctuation attached to its word).

    Returns:
        `float`: the F1, in [0, 1].
    """
    candidate_counts = _ngrams(candidate, n, level)
    reference_counts = _ngrams(reference, n, level)
    num_candidate = sum(candidate_counts.values())
    num_reference = sum(reference_counts.values())
    if num_candidate == 0 or num_reference == 0:
        return 0.0
    overlap = sum((candidate_counts & reference_counts).values())
    if overlap == 0:
        return 0.0
    precision = overlap / num_candidate
    recall = overlap / num_reference
    return 2 * precision * recall / (precision + recall)


class NGramF1Scorer:
    """Reference scorer: n-gram F1 between each completion's text and its row's reference text ([`ngram_f1_score`]).

    The prompt is not used. Texts come from [`message_text`]. Deterministic: multiset (`Counter`) overlap, no set
    iteration order involved. Build one with [`ngram_f1`]; [`ngram_f1_scorer`] is the default (character trigrams).

    Args:
        n (`int`, *optional*, defaults to `3`): n-gram length (at least 1).
        level (`str`, *optional*, defaults to `"char"`): `"char"` or `"word"`.
    """

    def __init__(self, n: int = 3, level: str = "char"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`n` must be an integer of at least 1, got {n!r}.")
        if level not in ("char", "word"):
            raise ValueError(f"`level` must be 'char' or 'word', got {level!r}.")
        self.n = n
        self.level = level
        self.__name__ = f"ngram_f1_{level}{n}"

    def __call__(self, prompts: list, references: list, completions: list, **kwargs: Any) -> list[float]:
        _check_rows(prompts, references, completions)
        return [
            ngram_f1_score(message_text(completion), message_text(reference), n=self.n, level=self.level)
            for reference, completion in zip(references, completions)
        ]

    def describe(self) -> dict[str, Any]:
        """`{"kind": "ngram_f1", "n": ..., "level": ...}`."""
        return {"kind": "ngram_f1", "n": self.n, "level": self.level}

    def __repr__(self) -> str:
        return f"NGramF1Scorer(n={self.n}, level={self.level!r})"


def ngram_f1(n: int = 3, level: str = "char") -> NGramF1Scorer:
    """A reference scorer returning the n-gram F1 of each completion against its reference.

    Why character trigrams by default: the answers this scorer compares are short (a few lines, about 150 characters
    in the embedded task), so word n-grams beyond unigrams are sparse (one changed word removes up to `n` of a
    sentence's few word n-grams) and word unigrams ignore order and case-insensitive spelling differences entirely.
    Character trigrams are dense on short text, keep local order, and see the surface changes instruction-following
    prompts ask for (case, commas, quotation marks, `<<title>>`, `* ` bullets); longer character n-grams (chrF uses up
    to 6) reward copied spans more than shared content. For word level, `n=1` or `n=2` is usually the better choice.

    Args:
        n (`int`, *optional*, defaults to `3`): n-gram length.
        level (`str`, *optional*, defaults to `"char"`): `"char"` or `"word"` (see [`ngram_f1_score`]).

    Returns:
        [`NGramF1Scorer`]: the scorer.
    """
    return NGramF1Scorer(n=n, level=level)


ngram_f1_scorer = ngram_f1()
"""The built-in reference scorer: character trigram F1 ([`ngram_f1`] with its defaults); spec `"ngram_f1"`."""


# --------------------------------------------------------------------------------------------------------------------
# Fixed sequence classifier (POLAR-style)
# --------------------------------------------------------------------------------------------------------------------


def _validate_template(template: str) -> None:
    if not isinstance(template, str):
        raise ValueError(
            f"`template` must be a format string, got {type(template).__name__}. The default is "
            f"{DEFAULT_REFERENCE_TEMPLATE!r}."
        )
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(
            f"`template` {template!r} is not a valid format string ({error}); write literal braces as '{{{{' and "
            f"'}}}}'. The default is {DEFAULT_REFERENCE_TEMPLATE!r}."
        ) from error
    for name in TEMPLATE_FIELDS:
        if name not in fields:
            raise ValueError(
                f"`template` has no {{{name}}} field: {template!r}. It needs {{prompt}}, {{reference}} and "
                f"{{completion}}, e.g. the default {DEFAULT_REFERENCE_TEMPLATE!r}."
            )
    unknown = sorted({field for field in fields if field not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(
            f"`template` has unknown field(s) {unknown} in {template!r}; only {{prompt}}, {{reference}} and "
            f"{{completion}} are filled (write literal braces as '{{{{' and '}}}}'). The default is "
            f"{DEFAULT_REFERENCE_TEMPLATE!r}."
        )


def _row_scores(output: Any) -> torch.Tensor:
    """One score per row from a model output: `.logits` (or the first element of a tuple), shape `(B, 1)` or `(B,)`."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    if logits.dim() == 2 and logits.shape[-1] == 1:
        logits = logits[:, 0]
    if logits.dim() != 1:
        raise ValueError(
            f"The scorer model returned logits of shape {tuple(logits.shape)}; a reference scorer needs one logit per "
            "row: load it with `num_labels=1`."
        )
    return logits.float()


class SequenceClassifierScorer:
    """
    A fixed (frozen) POLAR-style reference scorer: a sequence classifier with one logit reading
    `template.format(prompt=..., reference=..., completion=...)`.

    It is never trained here: on construction the model is put in `eval()` mode and every parameter gets
    `requires_grad_(False)` (a model passed in is frozen in place), it has no optimizer, and scoring runs under
    `torch.inference_mode()`. Calling it returns the raw logit of each row as a float ([`ReferenceScorer`] convention).

    Args:
        model (`str`, `os.PathLike` or `PreTrainedModel`):
            A sequence classifier with `num_labels=1`, or a local directory / Hub name loaded with
            `AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, **init_kwargs)`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Its tokenizer; by default `AutoTokenizer.from_pretrained` of the model's path (`model.name_or_path` for a
            model instance). Without a pad token it pads with the end-of-sequence token (the tokenizer is changed in
            place), and `model.config.pad_token_id` is always set to the tokenizer's pad id, which the classifier uses
            to find each row's last token.
        template (`str`, *optional*, defaults to [`DEFAULT_REFERENCE_TEMPLATE`]):
            Format string with the fields `{prompt}`, `{reference}` and `{completion}` (each filled with
            [`message_text`] of the row's value); checked on construction.
        batch_size (`int`, *optional*, defaults to `16`):
            Rows per forward pass.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Longest tokenized row. Longer rows are truncated **on the left** (their first tokens are dropped: with the
            default template, the start of the prompt), so the candidate, last in the template, is always seen whole
            unless it alone is longer. `None`: no truncation.
        device (`str` or `torch.device`, *optional*):
            Where to run. By default a model instance stays where it is, and a loaded model goes to CUDA when
            available, else the CPU. Quantized models are never moved.
        quantization_config (`transformers.BitsAndBytesConfig`, *optional*):
            Passed to `from_pretrained` (only when `model` is a path).
        init_kwargs (`dict`, *optional*):
            Other `from_pretrained` arguments (e.g. `{"dtype": torch.bfloat16}`, `{"trust_remote_code": True}`).
        allow_untrained_head (`bool`, *optional*, defaults to `False`):
            Accept a checkpoint that lacks some weights (e.g. a causal LM, whose score head would be random). By
            default that raises a `ValueError`: a fixed scorer with a random head scores noise.

    POLAR-style checkpoints: POLAR (internlm/POLAR-1_8B, internlm/POLAR-7B, arXiv 2507.05197) reads one sequence made
    of the prompt with the reference, a separator, then the prompt with the candidate. Its fine-tuning code (xtuner's
    reference preference dataset) builds `prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + candidate`,
    each part's messages joined by `"\\n"` (as [`message_text`] does), encodes it with the tokenizer's special tokens
    and appends the checkpoint's reward token, whose logit is the score. To reproduce this, set

    ```python
    template = "{prompt}\\n{reference}<|reward|>{prompt}\\n{completion}" + REWARD_TOKEN
    ```

    where `REWARD_TOKEN` is the token text the checkpoint ends its sequences with; compare the result of POLAR's own
    `RewardModelClient.encode` on a row with `template.format(...)` before training with it. The official POLAR
    checkpoints are InternLM2 models with custom code, loaded in their README with `AutoModel.from_pretrained(...,
    trust_remote_code=True)` and returning the reward as the first output; load such a model yourself and pass the
    instance (this class reads `.logits`, or the first element of a tuple output, of shape `(rows, 1)`). None of this
    was run here: no POLAR checkpoint was reachable, so the template above is taken from POLAR's published code, not
    tested against a checkpoint.
    """

    def __init__(
        self,
        model: str | os.PathLike | Any,
        tokenizer: Any | None = None,
        *,
        template: str = DEFAULT_REFERENCE_TEMPLATE,
        batch_size: int = 16,
        max_length: int | None = 1024,
        device: str | torch.device | None = None,
        quantization_config: Any | None = None,
        init_kwargs: dict[str, Any] | None = None,
        allow_untrained_head: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _validate_template(template)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"`max_length` must be a positive integer or None, got {max_length!r}.")
        init_kwargs = dict(init_kwargs or {})
        if isinstance(model, (str, os.PathLike)):
            name_or_path = str(model)
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            init_kwargs.setdefault("num_labels", 1)
            try:
                model, loading_info = AutoModelForSequenceClassification.from_pretrained(
                    name_or_path, output_loading_info=True, **init_kwargs
                )
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"Could not load the reference scorer model {name_or_path!r} with "
                    f"AutoModelForSequenceClassification.from_pretrained: {error}. Give a local directory written by "
                    "`save_pretrained` (with config.json and weights), or a Hub name reachable from here (it is not "
                    "when HF_HUB_OFFLINE=1 and the model is not cached)."
                ) from error
            missing = sorted(loading_info.get("missing_keys") or [])
            if missing and not allow_untrained_head:
                raise ValueError(
                    f"{name_or_path!r} is not a trained sequence classifier: its checkpoint lacks {missing[:4]}"
                    f"{' ...' if len(missing) > 4 else ''}, which would be randomly initialised (typically the score "
                    "head of a causal LM checkpoint), so its scores would be noise. Give a reward model saved as a "
                    "sequence classifier with num_labels=1, or pass `allow_untrained_head=True` if a random head is "
                    "what you want (tests)."
                )
            if device is None and not getattr(model, "is_quantized", False):
                device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            if quantization_config is not None or init_kwargs:
                raise ValueError(
                    "`quantization_config` and `init_kwargs` apply when the scorer loads its model from a path; "
                    "this model is already loaded, so load it with them yourself or pass its path instead."
                )
            name_or_path = getattr(model, "name_or_path", None) or type(model).__name__
        if type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels != 1:
            raise ValueError(
                f"The reference scorer model {name_or_path!r} has num_labels={model.config.num_labels}; it must "
                "return one logit per row: load it with `num_labels=1`."
            )
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(
                    f"Could not load a tokenizer for the reference scorer model {name_or_path!r}: {error}. Pass "
                    "`tokenizer=` explicitly."
                ) from error
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"The tokenizer of {name_or_path!r} has neither a pad token nor an end-of-sequence token; set "
                    "`tokenizer.pad_token` before building the scorer."
                )
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

        model.eval()
        model.requires_grad_(False)
        if device is not None and not getattr(model, "is_quantized", False):
            model.to(device)

        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length
        self.name_or_path = name_or_path
        self.__name__ = "sequence_classifier_scorer"

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go."""
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            return device
        return next(self.model.parameters()).device

    def render(self, prompts: list, references: list, completions: list) -> list[str]:
        """The text the model reads for each row: `template` filled with [`message_text`] of each value."""
        _check_rows(prompts, references, completions)
        return [
            self.template.format(
                prompt=message_text(prompt), reference=message_text(reference), completion=message_text(completion)
            )
            for prompt, reference, completion in zip(prompts, references, completions)
        ]

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizer
        truncation_side = getattr(tokenizer, "truncation_side", "right")
        tokenizer.truncation_side = "left"
        try:
            return tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                padding_side="right",  # positions then do not depend on the other rows of the batch
                truncation=self.max_length is not None,
                max_length=self.max_length,
            )
        finally:
            tokenizer.truncation_side = truncation_side

    def __call__(self, prompts: list, references: list, completions: list, **kwargs: Any) -> list[float]:
        """Score each completion against its row's reference; returns the model's logit per row."""
        texts = self.render(prompts, references, completions)
        scores: list[float] = []
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                encoded = self._encode(texts[start : start + self.batch_size])
                output = self.model(
                    input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
                )
                scores.extend(_row_scores(output).cpu().tolist())
        return scores

    def describe(self) -> dict[str, Any]:
        """`{"kind": "sequence_classifier", "name_or_path": ..., "template": ..., "max_length": ...}`."""
        return {
            "kind": "sequence_classifier",
            "name_or_path": self.name_or_path,
            "template": self.template,
            "max_length": self.max_length,
        }

    def __repr__(self) -> str:
        return f"SequenceClassifierScorer({self.name_or_path!r})"


# --------------------------------------------------------------------------------------------------------------------
# Loading and describing
# --------------------------------------------------------------------------------------------------------------------

_DOTTED_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_SPEC_HELP = (
    "A reference scorer is 'ngram_f1' (the built-in character n-gram F1), a dotted import path 'pkg.module.fn' to a "
    "callable scorer(prompts, references, completions, **kwargs) -> list[float], or a local directory / Hub name of "
    "a sequence classifier with num_labels=1."
)


def _check_signature(scorer: Any, spec: str) -> None:
    try:
        signature = inspect.signature(scorer)
    except (TypeError, ValueError):  # builtins and some C callables have no signature: nothing to check
        return
    try:
        signature.bind([], [], [])
    except TypeError as error:
        raise ValueError(
            f"The reference scorer {spec} cannot be called as scorer(prompts, references, completions): {error}. "
            "Define it as `def scorer(prompts, references, completions, **kwargs) -> list[float]`."
        ) from None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        raise ValueError(
            f"The reference scorer {spec} takes no **kwargs; the trainer may pass other dataset columns as keyword "
            "arguments. Define it as `def scorer(prompts, references, completions, **kwargs) -> list[float]`."
        )


def _import_object(spec: str) -> Any:
    parts = spec.split(".")
    module = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only "this very module (or a parent) does not exist" means: try a shorter prefix.
            if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue
            raise ValueError(
                f"Importing {module_name!r} for the reference scorer {spec!r} failed: {error}."
            ) from error
        except Exception as error:  # any import-time failure is reported with the spec
            raise ValueError(
                f"Importing {module_name!r} for the reference scorer {spec!r} failed: {type(error).__name__}: {error}."
            ) from error
        break
    if module is None:
        raise ValueError(
            f"Cannot import the reference scorer {spec!r}: no module {'.'.join(parts[:-1])!r} (nor any prefix of it) "
            f"can be imported. Check the spelling and that the package is installed or on PYTHONPATH. {_SPEC_HELP}"
        )
    value: Any = module
    for attribute in parts[cut:]:
        if not hasattr(value, attribute):
            raise ValueError(
                f"Cannot find the reference scorer {spec!r}: {'.'.join(parts[:cut])!r} was imported but has no "
                f"attribute {attribute!r}. Check the name. {_SPEC_HELP}"
            )
        value = getattr(value, attribute)
    return value


def _looks_local(spec: str) -> bool:
    if spec.startswith((".", "/", "~")) or os.path.isabs(spec) or (os.sep != "/" and os.sep in spec):
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).exists()


def _spec_kind(spec: Any) -> str:
    """What [`load_reference_scorer`] makes of `spec`: "callable", "builtin", "model", "dotted", "missing" (a local
    path that does not exist) or "invalid"."""
    if callable(spec) and not isinstance(spec, str):
        return "callable"
    if not isinstance(spec, (str, os.PathLike)):
        return "invalid"
    spec = os.fspath(spec)
    if not spec.strip():
        return "invalid"
    if spec == "ngram_f1":
        return "builtin"
    if Path(spec).expanduser().is_dir():
        return "model"
    if _DOTTED_PATH.match(spec):
        return "dotted"
    if _looks_local(spec) or Path(spec).expanduser().exists():
        return "missing"
    return "model"  # a Hub name


def is_model_spec(spec: Any) -> bool:
    """Whether [`load_reference_scorer`] would load `spec` as a model ([`SequenceClassifierScorer`]): an existing
    directory, a local path (even a missing one, which then fails to load) or a Hub name; `False` for a callable,
    `"ngram_f1"`, a dotted import path and values that are no spec at all. The model options of
    [`load_reference_scorer`] (`template`, `init_kwargs`, `quantization_config`, `device`) apply exactly when this is
    `True`.

    Args:
        spec: what [`load_reference_scorer`] takes.

    Returns:
        `bool`
    """
    return _spec_kind(spec) in ("model", "missing")


def load_reference_scorer(
    spec: str | Any,
    *,
    template: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
    quantization_config: Any | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Resolve a reference scorer from a spec (what a config or the command line gives).

    Args:
        spec (`str` or callable):
            - a callable: returned as is (its signature is checked);
            - `"ngram_f1"`: [`ngram_f1_scorer`];
            - a dotted import path `"pkg.module.fn"` (or `"pkg.module.obj.attr"`): the object is imported and returned
              (a function, or a scorer instance defined at module level; it must be callable);
            - a local directory, or a Hub name such as `"org/model"`: a [`SequenceClassifierScorer`] loading it.

            An existing directory wins over a dotted path of the same name.
        template (`str`, *optional*): the [`SequenceClassifierScorer`] template (default
            [`DEFAULT_REFERENCE_TEMPLATE`]); model specs only.
        init_kwargs (`dict`, *optional*): `from_pretrained` arguments; model specs only.
        quantization_config (*optional*): passed to `from_pretrained`; model specs only.
        device (`str` or `torch.device`, *optional*): where the model runs; model specs only.

    Returns:
        A callable `scorer(prompts, references, completions, **kwargs) -> list[float]`.

    Raises:
        `ValueError`: for an unusable spec (unknown module or attribute, an object that is not callable or has the
            wrong signature, a missing local directory, a directory or Hub name that does not load) or model options
            given with a spec that is not a model; the message says how to fix it.
    """
    model_options = {
        "template": template,
        "init_kwargs": init_kwargs,
        "quantization_config": quantization_config,
        "device": device,
    }
    given = sorted(name for name, value in model_options.items() if value is not None)

    def no_model_options(kind: str) -> None:
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply to a model reference scorer (a local directory or Hub name); the "
                f"spec {spec!r} is {kind}. Remove them, or give a model spec."
            )

    kind = _spec_kind(spec)
    if kind == "callable":
        no_model_options("a callable")
        _check_signature(spec, repr(spec))
        return spec
    if kind == "invalid":
        if isinstance(spec, (str, os.PathLike)):
            raise ValueError(f"The reference scorer spec is empty. {_SPEC_HELP}")
        raise ValueError(f"Unusable reference scorer spec {spec!r} ({type(spec).__name__}). {_SPEC_HELP}")
    spec = os.fspath(spec)
    if kind == "builtin":
        no_model_options("the built-in n-gram F1")
        return ngram_f1_scorer
    path = Path(spec).expanduser()
    if kind == "model" and path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"The reference scorer directory {str(path)!r} has no config.json: it is not a saved model. Give the "
                "folder `save_pretrained` wrote (for the embedded task: the path `build_reference_scorer()` returns)."
            )
        return _model_scorer(str(path), template, init_kwargs, quantization_config, device)
    if kind == "dotted":
        no_model_options("a dotted import path")
        scorer = _import_object(spec)
        if not callable(scorer):
            raise ValueError(
                f"The reference scorer {spec!r} is a {type(scorer).__name__}, not a callable. Point the spec at a "
                "function scorer(prompts, references, completions, **kwargs) -> list[float]."
            )
        _check_signature(scorer, repr(spec))
        return scorer
    if kind == "missing":
        raise ValueError(
            f"Reference scorer directory not found: {spec!r} (current directory {os.getcwd()!r}). Check the "
            f"path; build the embedded task's scorer with `trl_uniapl.demo.reference_scorer.build_reference_scorer()`."
            f" {_SPEC_HELP}"
        )
    return _model_scorer(spec, template, init_kwargs, quantization_config, device)


def _model_scorer(
    name_or_path: str,
    template: str | None,
    init_kwargs: dict[str, Any] | None,
    quantization_config: Any | None,
    device: str | torch.device | None,
) -> SequenceClassifierScorer:
    return SequenceClassifierScorer(
        name_or_path,
        template=DEFAULT_REFERENCE_TEMPLATE if template is None else template,
        init_kwargs=init_kwargs,
        quantization_config=quantization_config,
        device=device,
    )


def describe_scorer(scorer: Any) -> dict[str, Any]:
    """A JSON-ready record of which reference scorer is used (for checkpoints and reports).

    Scorers with a `describe()` method ([`NGramF1Scorer`], [`SequenceClassifierScorer`]) give its result; any other
    callable gives `{"kind": "callable", "name": "<module>.<qualified name>"}`.

    Args:
        scorer: a reference scorer.

    Returns:
        `dict[str, Any]`: the record.

    Raises:
        `ValueError`: if `scorer` is not callable.
    """
    describe = getattr(scorer, "describe", None)
    if callable(describe) and not inspect.isclass(scorer):
        return dict(describe())
    if not callable(scorer):
        raise ValueError(f"{scorer!r} is not a reference scorer (not callable).")
    target = scorer if hasattr(scorer, "__qualname__") else type(scorer)
    if hasattr(scorer, "func") and hasattr(scorer, "args"):  # functools.partial
        target = scorer.func
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return {"kind": "callable", "name": f"{module}.{qualname}" if module else qualname}
