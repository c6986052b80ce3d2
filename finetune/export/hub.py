"""Upload an exported LoRA folder to the Hugging Face Hub (when asked); local files are never touched."""
from __future__ import annotations

from pathlib import Path

from ..console import brief
from ..errors import FinetuneError


def push_to_hub(repo_id: str, folder: str | Path, files: list[str]) -> str:
    """Create (if needed) the model repo and upload `files` from `folder`; return the repo URL."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        api = huggingface_hub.HfApi()
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                          commit_message="Upload LoRA trained with finetune")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        reason = brief(exc, 200)
        raise FinetuneError(f"export.push_to_hub: could not upload to {repo_id} ({reason}); the files stay in "
                            f"{folder}, upload them later with `huggingface-cli upload {repo_id} {folder}`") from None
    return str(url)
