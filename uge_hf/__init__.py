"""uge-hf: Ungeneralizable Examples for Hugging Face datasets.

Protect an image dataset so that it stays learnable for one authorized model (an
architecture plus its initial weights, the key) and becomes unlearnable for every other.

Start with :func:`protect` (a dataset and a key in, a protected Hub-layout folder out),
:class:`AuthorizedModel` (the key) and :func:`load_protected` (the authorized side); the
README walks the whole journey.
"""

__version__ = "0.2.3"

# Names resolve on first use (PEP 562): `uge-hf --help` and `--version` answer without
# importing torch and datasets, which take seconds.
_EXPORTS = {
    "AuthorizedModel": "key", "GuessableKeyWarning": "config", "LargeDatasetWarning": "config", "MixedKeysWarning": "config",
    "ProtectConfig": "config", "UGETransform": "transform", "evaluate": "evaluation",
    "load_protected": "hub", "protect": "protection", "push_to_hub": "hub", "train_authorized": "evaluation", "verify": "hub",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uge_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
