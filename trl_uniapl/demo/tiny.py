"""Build small causal language models and their tokenizers on disk, with no network.

Tests, demos and notebooks need a real checkpoint directory (``from_pretrained`` and TRL's reference-model reload
read ``_name_or_path``), but the Hugging Face Hub is out of reach. [`build_tiny_model`] trains a byte-level BPE
tokenizer on a corpus, wraps it in a [`~transformers.PreTrainedTokenizerFast`] with ChatML special tokens and chat
template, creates a randomly initialised Qwen3 model and saves both with ``save_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# ChatML, as Qwen3 uses it, without the thinking blocks: the student never needs them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens on `corpus`.

    The returned tokenizer pads on the left (what GRPO generation expects), uses `<|im_end|>` as end of sequence and
    `<|endoftext|>` as padding, and carries a ChatML chat template.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_tiny_model(
    output_dir: str | os.PathLike,
    corpus: Iterable[str],
    vocab_size: int = 2000,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> str:
    """Train a tokenizer on `corpus`, create a random Qwen3 causal LM and save both to `output_dir`.

    Returns `output_dir` as a string, ready to pass as `model=` to a trainer or to `from_pretrained`.
    """
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
