"""trl-uniapl: UniAPL (Unified Adversarial Preference Learning) as a drop-in TRL trainer.

`from trl_uniapl import UniAPLConfig, UniAPLTrainer`. The package's folders are its architecture:

- the library a TRL user imports: `config`, `trainer` (the hooks on GRPOTrainer), the two terms it attaches,
  `sft_term` and `adversarial_term`, the adversarial term's scorers `discriminator` (and `shared_discriminator`) and
  `reference_scorers`, `luffy` (the expert inside the group), `streams`, `checkpoints`;
- `trl_uniapl.ifeval`: instruction following (IFEval rewards, the embedded task and its expert, the evaluation),
  imported on demand because it needs the `ifeval` extra;
- `trl_uniapl.demo`: the demo's student, tiny models and the embedded task's reference scorer, built locally;
- `trl_uniapl.cli`: the `trl-uniapl` command (train, demo, evaluate, plots).

The public names are imported on first use: importing TRL's trainers imports bitsandbytes, whose import logs a
notice that the `trl-uniapl` command hides, which it can only do if nothing imported bitsandbytes before it started.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Discriminator": "discriminator",
    "UniAPLConfig": "config",
    "UniAPLTrainer": "trainer",
    "last_complete_checkpoint": "trainer",
}

__all__ = [*sorted(_PUBLIC), "__version__"]

if TYPE_CHECKING:
    from .config import UniAPLConfig as UniAPLConfig
    from .discriminator import Discriminator as Discriminator
    from .trainer import UniAPLTrainer as UniAPLTrainer
    from .trainer import last_complete_checkpoint as last_complete_checkpoint


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
