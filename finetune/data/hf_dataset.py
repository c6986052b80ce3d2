"""Instance examples from a `datasets` dataset: a save_to_disk folder, an imagefolder, or a Hub dataset name."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps

from ..console import brief
from ..errors import FinetuneError
from .images import open_rgb, to_rgb


def load_image_dataset(name: str, split: str):
    """The `split` of a dataset: load_from_disk for a saved folder, imagefolder for a folder of images (with an
    optional metadata.jsonl), else a Hub dataset name."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise FinetuneError(f"data.dataset_split: {name} has no split {split!r}; it has "
                                        f"{', '.join(data)}")
                data = data[split]
            return data
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        if name.startswith((".", "/", "~")):
            raise FinetuneError(f"data.dataset: folder {name} does not exist; fix the path")
        unreachable = hub_unreachable()
        if unreachable:
            raise FinetuneError(f"data.dataset: {name} is read as a Hub dataset name, but the Hub cannot be reached "
                                f"({unreachable}); set HF_HUB_OFFLINE=1 to use a copy in the Hub cache, or give a "
                                "local folder")
        return datasets.load_dataset(name, split=split)
    except FinetuneError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        reason = brief(exc)
        raise FinetuneError(f"data.dataset: could not load {name} (split {split}): {reason}") from None


def hub_unreachable() -> str | None:
    """Why the Hub's host does not resolve from here, or None. Without a network, huggingface_hub retries each
    request five times over about 23 s, printing two lines per try, before datasets gives its error; a failed name
    lookup says the same at once. Not asked in offline mode (datasets then answers at once) or behind a proxy
    (which looks names up itself)."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if huggingface_hub.is_offline_mode() or any(os.environ.get(name) for name in proxies):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return None


def check_columns(data, name: str, image_column: str, caption_column: str | None) -> None:
    columns = list(data.column_names)
    if image_column not in columns:
        raise FinetuneError(f"data.image_column: {name} has no column {image_column!r}; its columns are "
                            f"{', '.join(columns)}")
    if caption_column is not None and caption_column not in columns:
        raise FinetuneError(f"data.caption_column: {name} has no column {caption_column!r}; its columns are "
                            f"{', '.join(columns)} (or leave data.caption_column unset for the instance prompt)")


def row_image(data, index: int, column: str) -> Image.Image:
    """Row `index`'s image upright in RGB; the column may hold images or paths to them. An image that does not
    decode (corrupt or truncated bytes) is a one-line error naming the row, which screening can skip."""
    try:
        value = data[index][column]
        if isinstance(value, Image.Image):
            value.load()
            return to_rgb(ImageOps.exif_transpose(value))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt bytes (DecompressionBombError, ...)
        raise FinetuneError(f"data.dataset row {index} ({column!r}): not a readable image ({exc}); fix or drop "
                            "the row") from None
    if isinstance(value, str):
        return open_rgb(value)
    raise FinetuneError(f"data.image_column: row {index} of column {column!r} holds {type(value).__name__}, "
                        "not an image or a path to one")


def dataset_rows(name: str, split: str, image_column: str, caption_column: str | None):
    """(dataset, [(row index, caption or None)]) for every row."""
    data = load_image_dataset(name, split)
    check_columns(data, name, image_column, caption_column)
    if len(data) == 0:
        raise FinetuneError(f"data.dataset: {name} (split {split}) has no rows")
    captions = data[caption_column] if caption_column else [None] * len(data)
    rows = [(i, (str(c).strip() or None) if c is not None else None) for i, c in enumerate(captions)]
    return data, rows
