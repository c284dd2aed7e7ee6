"""uge-hf: Ungeneralizable Examples for Hugging Face datasets.

Protect an image dataset so that it stays learnable for one authorized model (an
architecture plus its initial weights, the key) and becomes unlearnable for every other.

Example:
    >>> from datasets import load_dataset
    >>> from uge_hf import AuthorizedModel, ProtectConfig, protect
    >>> ds = load_dataset("../shared/data/cifar10", split="train[:500]")  # doctest: +SKIP
    >>> key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
    >>> out = protect(ds, key, ProtectConfig.preset("fast"), output_dir="cifar10-uge")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import ProtectConfig  # noqa: E402
from .evaluation import evaluate, train_authorized  # noqa: E402
from .hub import load_protected, push_to_hub, verify  # noqa: E402
from .key import AuthorizedModel  # noqa: E402
from .protect import protect  # noqa: E402
from .transform import UGETransform  # noqa: E402

__all__ = [
    "AuthorizedModel", "ProtectConfig", "UGETransform", "evaluate", "load_protected", "protect", "push_to_hub",
    "train_authorized", "verify", "__version__",
]
