"""The license a LoRA's model card states: the base model's, read from its own card or metadata.

A LoRA is a derivative of its base model, so its card carries the base model's license: SD 1.5's is
creativeml-openrail-m, SDXL's openrail++, others differ. It is read from the base model's card (README.md of a
local folder or in the Hub cache, else the Hub's model info when online) or, for a single .safetensors
checkpoint, its `modelspec.license` header. Found nowhere, the card states no license and says so, and the run
says to fill it in: a wrong license is worse than none.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("finetune")


def card_license(card_path: str | Path) -> str | None:
    """The `license:` of a model card's YAML header, or None."""
    from huggingface_hub import ModelCard

    try:
        license = ModelCard.load(card_path).data.license
    except (OSError, ValueError):
        return None
    return str(license) if license else None


def hub_license(repo_id: str, revision: str | None) -> str | None:
    """From the Hub cache's copy of the card, else (online) the Hub's model info; None when neither answers."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    cached = huggingface_hub.try_to_load_from_cache(repo_id, "README.md", revision=revision)
    if isinstance(cached, str):
        return card_license(cached)
    if huggingface_hub.is_offline_mode():
        return None
    try:
        card = huggingface_hub.HfApi().model_info(repo_id, revision=revision, timeout=10).card_data
    except (HfHubHTTPError, OSError, ValueError):
        return None
    license = card.get("license") if card else None
    return str(license) if license else None


def base_model_license(pretrained: str, revision: str | None = None) -> str | None:
    """The license of the base model `pretrained` names (folder, single file or Hub id), or None if not found."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return card_license(path / "README.md") if (path / "README.md").is_file() else None
    if path.is_file():
        from safetensors import SafetensorError

        from .diffusers_format import read_header
        try:
            return read_header(path).get("modelspec.license") or None
        except (SafetensorError, OSError, ValueError):  # e.g. a pickle checkpoint (model.allow_pickle)
            return None
    return hub_license(pretrained, revision)


def model_card_license(configured: str | None, base_model: str) -> str | None:
    """export.license when set, else the base model's; a notice when neither is known."""
    license = configured or base_model_license(base_model)
    if license is None:
        log.warning("notice: the license of %s was not found (no license in its model card or metadata); the model "
                    "card states none: fill in its `license:` (the base model's) before sharing, or set "
                    "export.license", base_model)
    return license
