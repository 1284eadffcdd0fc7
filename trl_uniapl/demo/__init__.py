"""The demo's models, built locally (no Hub): [`tiny`] builds a tiny Qwen3 model with its own tokenizer (also what the
tests train), [`student`] the embedded task's student, warmed up on the task's text and cached."""
