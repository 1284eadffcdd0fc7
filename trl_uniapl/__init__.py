"""trl-uniapl: UniAPL (Unified Adversarial Preference Learning) as a drop-in TRL trainer.

`from trl_uniapl import UniAPLConfig, UniAPLTrainer`. The package's folders are its architecture:

- the library a TRL user imports: `config`, `trainer`, `discriminator` (and `shared_discriminator`), `streams`,
  `checkpoints`;
- `trl_uniapl.ifeval`: instruction following (IFEval rewards, the embedded task and its expert, the evaluation),
  imported on demand because it needs the `ifeval` extra;
- `trl_uniapl.demo`: the demo's student and tiny models, built locally;
- `trl_uniapl.cli`: the `trl-uniapl` command (train, demo, evaluate, plots).
"""

from .config import UniAPLConfig
from .discriminator import Discriminator
from .trainer import UniAPLTrainer, last_complete_checkpoint

__version__ = "0.1.0"

__all__ = ["Discriminator", "UniAPLConfig", "UniAPLTrainer", "__version__", "last_complete_checkpoint"]
