"""uge-hf: Ungeneralizable Examples for Hugging Face datasets.

Protect an image dataset so that it stays learnable for one authorized model (an
architecture plus its initial weights, the key) and becomes unlearnable for every other.

Start with :func:`protect` (a dataset and a key in, a protected Hub-layout folder out),
:class:`AuthorizedModel` (the key) and :func:`load_protected` (the authorized side); the
README walks the whole journey.
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
