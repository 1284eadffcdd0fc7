"""trl-uniapl: UniAPL (Unified Adversarial Preference Learning) as a drop-in TRL trainer.

`from trl_uniapl import UniAPLConfig, UniAPLTrainer`. The IFEval rewards (`trl_uniapl.rewards`), the embedded task
(`trl_uniapl.task`), the local student (`trl_uniapl.student`) and the evaluation (`trl_uniapl.evaluation`) are
submodules, imported on demand because they need the `ifeval` extra.
"""

from .config import UniAPLConfig
from .discriminator import Discriminator
from .trainer import UniAPLTrainer, last_complete_checkpoint

__version__ = "0.1.0"

__all__ = ["Discriminator", "UniAPLConfig", "UniAPLTrainer", "__version__", "last_complete_checkpoint"]
