"""Dataset cards: YAML metadata the Hub understands plus a ``uge_hf:`` block that records
the key, rendered from ``card_templates/`` through ``huggingface_hub.DatasetCard``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from datasets import DatasetInfo, Features
from huggingface_hub import DatasetCard, DatasetCardData

from .config import ProtectConfig
from .evaluation import efficacy_markdown
from .folder import CARD_NAME, FIGURE_NAME, check_card, folder_features, read_metadata, record_hashes, shards_by_split, write_metadata
from .utils import atomic_write

DEFAULT_TEMPLATE = "dataset_card.md"


def default_template() -> Path:
    """``card_templates/dataset_card.md``: inside the installed package, or at the top of a
    source checkout (an editable install)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "card_templates", here.parent / "card_templates"):
        if (folder / DEFAULT_TEMPLATE).exists():
            return folder / DEFAULT_TEMPLATE
    raise FileNotFoundError(f"{DEFAULT_TEMPLATE} not found next to {here}; reinstall uge-hf")


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if num_rows < bound:
            return label
    return "n>10M" if num_rows > 10_000_000 else "1M<n<10M"


# Config fields the public record (card, ``uge_hf.json``) leaves out unless the keys'
# architectures are disclosed: match_every_key is advised for keys of different architectures
# (config.mixed_keys_advice), so its value would tell a reader whether they differ (DESIGN.md 2).
# The state folder's config keeps them, for a rerun.
ARCHITECTURE_HINTS = ("match_every_key",)


def withheld_fields(disclose_key_architecture: bool) -> list[str]:
    """The config fields the public record leaves out: :data:`ARCHITECTURE_HINTS`, none if the
    keys' architectures are disclosed anyway."""
    return [] if disclose_key_architecture else list(ARCHITECTURE_HINTS)


def public_config(config: ProtectConfig, withheld: Sequence[str]) -> dict:
    """``config`` as the public record holds it: without the fields ``withheld``."""
    return {k: v for k, v in config.to_dict().items() if k not in withheld}


def architectures_disclosed(metadata: dict) -> bool:
    """Whether a protected folder's metadata records every key's architecture."""
    return all("architecture" in k for k in metadata["keys"])


# What an efficacy row of a key loses in public.
KEY_ROW_ACCURACIES = ("clean_acc", "protected_acc", "clean_best_acc", "protected_best_acc", "attack_clean_acc", "attack_clean_best_acc")


def public_efficacy(efficacy: Optional[dict], disclose_key_architecture: bool) -> Optional[dict]:
    """A measured efficacy table (``{"rows": [...], "summary": {...}}``, as ``uge-hf evaluate
    --json`` writes it) as the public record holds it (DESIGN.md 2).

    Training times go: how long the key's rows took tells a hacker how big its architecture
    is. Unless the keys' architectures are disclosed, what a reader could match by training
    each candidate architecture on the public rows goes too: the rows of the key's
    architecture from another seed (a public seed, so their figures are reproducible exactly),
    the keys' accuracies and the summary's ``authorized_gap_pt`` (with a ratio, the clean
    accuracy). The keys' ratios stay, to two decimals: unrounded, a ratio of two accuracies
    over ``test_rows`` images gives both back."""
    if efficacy is None:
        return None
    from .evaluation import KEY, SIBLING_PREFIX

    def public(row: dict) -> dict:
        # Fields in name order, as uge_hf.json keeps them: a rerun renders the card from that file.
        row = {k: row[k] for k in sorted(row) if not k.endswith("seconds")}
        if not disclose_key_architecture and row["model"].startswith(KEY):
            row.update(dict.fromkeys(KEY_ROW_ACCURACIES))
            row.update({k: round(row[k], 2) for k in ("ratio", "best_ratio") if row.get(k) is not None})
        return row

    def rounded(value):  # a ratio, or a {name: ratio} map
        return {k: round(v, 2) for k, v in value.items()} if isinstance(value, dict) else round(value, 2)

    summary = dict(efficacy.get("summary") or {})
    if not disclose_key_architecture:
        for name in ("authorized_gap_pt", "sibling_ratio"):
            summary.pop(name, None)
        summary.update({k: rounded(summary[k]) for k in ("key_ratio", "key_best_ratio", "key_ratios", "key_recipe_ratios")
                        if summary.get(k) is not None})
    rows = [public(r) for r in efficacy.get("rows", []) if disclose_key_architecture or not r["model"].startswith(SIBLING_PREFIX)]
    return {**efficacy, "rows": rows, "summary": summary}


def matching_schedule(config: ProtectConfig, num_keys: int, withheld: Sequence[str] = ()) -> str:
    """The card's account of when the keys' gradients were matched: how often (the effective
    ``matching_interval``, not the ``gm_every`` asked for) and, with several keys, which, unless
    ``withheld`` names ``match_every_key``."""
    if not (config.lambda_gm or config.lambda_bind):
        return "off"
    interval = config.matching_interval
    search = "every {0}step" if interval == 1 else "one {0}step in " + str(interval)
    if config.mode == "generator":
        when = "every step of the generator's fit" + (", then " + search.format("refinement ") if config.refine_steps else "")
    else:
        when = search.format("search ")
    if num_keys == 1:
        return when
    if "match_every_key" in withheld:
        return when + ", which keys each time not recorded"
    return when + (", every key each time" if config.match_every_key else ", the keys in turn")


def uge_block(metadata: dict, config: ProtectConfig) -> dict:
    """The ``uge_hf:`` YAML block: everything a consumer needs to check the key and the data
    (``config``: ``metadata["config"]``, parsed)."""
    keys, withheld = metadata["keys"], metadata.get("withheld", [])
    block = {
        "version": metadata["uge_hf_version"],
        "method": "ungeneralizable-examples",
        # Each key's hashes and nothing that narrows a search for it (no seed, no repo; the
        # architecture only if the protector opted in), DESIGN.md 2.
        "key_fingerprints": [k["fingerprint"] for k in keys],
        "key_weights_sha256": [k["weights_sha256"] for k in keys],
        "epsilon": config.epsilon,
        "mode": config.mode,
        "loss_weights": {"gm": config.lambda_gm, "am": config.lambda_am, "fd": config.lambda_fd, "kc": config.lambda_kc,
                         "ud": config.lambda_ud, "bind": config.lambda_bind},
        "matching_interval": config.matching_interval,
        "steps": config.steps,
        "seed": config.seed,
        "state_fingerprint": metadata["state_fingerprint"],
        "generator_fingerprint": metadata["generator_fingerprint"],
        "shards": metadata["shards"],
        "perturbed_fraction": metadata.get("perturbed_fraction"),
        "efficacy": (metadata.get("efficacy") or {}).get("rows"),
        "efficacy_epochs": (metadata.get("efficacy") or {}).get("epochs"),
    }
    if "match_every_key" not in withheld:
        block["match_every_key"] = config.match_every_key
    if architectures_disclosed(metadata):
        block.update(key_architectures=[k["architecture"] for k in keys], key_num_classes=keys[0]["num_classes"])
    return block


def render_card(metadata: dict, features: Features, *, template: Optional[str | os.PathLike] = None, repo_id: Optional[str] = None) -> DatasetCard:
    """Render the card for a protected folder's ``uge_hf.json`` metadata.

    ``template`` is a path to your own Jinja template (default: the one ``protect`` was given,
    which ``uge_hf.json`` keeps as ``card_template``, so ``push`` and ``evaluate --update-card``
    render with it too; else uge-hf's); it receives ``card_data`` (the YAML),
    ``meta`` (the metadata), ``efficacy`` (a Markdown table or ``None``), ``repo_id``,
    ``pretty_name``, ``epsilon_255`` and ``gradient_matching`` (:func:`matching_schedule`).
    """
    # A folder written before a config field existed reads as that field's default (off), so
    # `evaluate --update-card` on it still renders; a withheld field stays out.
    config, withheld = ProtectConfig.from_dict(metadata["config"]), metadata.get("withheld", [])
    metadata = {**metadata, "config": public_config(config, withheld)}
    splits = metadata["protected_splits"] + metadata["copied_splits"]
    info = DatasetInfo(features=features)._to_yaml_dict()
    info["splits"] = [{"name": s, "num_bytes": metadata["num_bytes"][s], "num_examples": metadata["num_rows"][s]} for s in splits]
    # Exactly the listed files: a file slipped in beside them is not loaded (nor verified).
    by_split = shards_by_split(metadata["shards"])
    data_files = [{"split": s, "path": by_split[s]} for s in splits]
    pretty_name = f"{repo_id.split('/')[-1] if repo_id else 'Protected dataset'} (UGE-protected)"
    card_data = DatasetCardData(
        license=(metadata.get("source") or {}).get("license"), task_categories=["image-classification"], size_categories=[size_category(sum(metadata["num_rows"].values()))],
        pretty_name=pretty_name, tags=["uge", "unlearnable-examples", "ungeneralizable-examples", "data-protection"],
        configs=[{"config_name": "default", "data_files": data_files}] if metadata.get("output_format", "parquet") == "parquet" else None,
        dataset_info=info, uge_hf=uge_block(metadata, config),
    )
    template_str = Path(template).read_text() if template else metadata.get("card_template") or default_template().read_text()
    efficacy = metadata.get("efficacy")
    others = [c for c in features if c not in (metadata["image_column"], metadata["label_column"])]
    return DatasetCard.from_template(
        card_data, template_str=template_str, meta=metadata, repo_id=repo_id or "<your-namespace>/<this-dataset>",
        efficacy=efficacy_markdown(efficacy["rows"]) if efficacy else None, pretty_name=pretty_name,
        epsilon_255=round(config.epsilon * 255, 2), gradient_matching=matching_schedule(config, len(metadata["keys"]), withheld),
        other_columns=", ".join(f"`{c}`" for c in others),
    )


def write_card(out_dir: str | os.PathLike, metadata: dict, features: Features, *, template: Optional[str | os.PathLike] = None,
               repo_id: Optional[str] = None) -> DatasetCard:
    """Render and write ``README.md`` into a protected folder (atomically)."""
    card = render_card(metadata, features, template=template, repo_id=repo_id)
    atomic_write(Path(out_dir) / CARD_NAME, str(card).encode())
    return card


def record_efficacy(folder: str | os.PathLike, efficacy: dict) -> DatasetCard:
    """Store a measured efficacy table (``{"rows": [...], "summary": {...}}``, as
    ``uge-hf evaluate --json`` writes it) in a protected folder's metadata and card, as
    :func:`public_efficacy` leaves it (both are public)."""
    folder = Path(folder)
    check_card(folder)
    metadata = read_metadata(folder)
    metadata["efficacy"] = public_efficacy(efficacy, architectures_disclosed(metadata))
    write_metadata(folder, metadata)
    card = write_card(folder, metadata, folder_features(folder))
    drawn = [FIGURE_NAME] if efficacy.get("figure") == FIGURE_NAME and (folder / FIGURE_NAME).is_file() else []
    record_hashes(folder, CARD_NAME, *drawn)
    return card
