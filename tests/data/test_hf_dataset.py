"""`datasets` input: a save_to_disk folder and an imagefolder with metadata.jsonl, built locally."""
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data.dataset import instance_examples
from finetune.data.screening import screen_photos
from finetune.errors import FinetuneError
from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def saved_dataset(photos, folder):
    paths = sorted(photos.glob("*.jpg"))
    data = datasets.Dataset.from_dict(
        {"picture": [Image.open(p) for p in paths], "caption": [f"{{trigger}} view {i}" for i in range(len(paths))]},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}))
    data.save_to_disk(str(folder))
    return paths


def image_folder(photos, folder):
    folder.mkdir()
    lines = []
    for i, path in enumerate(sorted(photos.glob("*.jpg"))[:3]):
        Image.open(path).save(folder / path.name)
        lines.append(json.dumps({"file_name": path.name, "text": "on a sofa" if i else ""}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_saved_dataset_with_named_columns(photos, tmp_path):
    paths = saved_dataset(photos, tmp_path / "saved")
    data = DataConfig(dataset=str(tmp_path / "saved"), image_column="picture", caption_column="caption",
                      trigger="sks cat")
    examples = instance_examples(data)
    assert [e.prompt for e in examples] == [f"sks cat view {i}" for i in range(len(paths))]
    assert np.array_equal(np.asarray(examples[1].open()), np.asarray(Image.open(paths[1]).convert("RGB")))
    with pytest.raises(FinetuneError, match="data.image_column: .* has no column 'image'; its columns are picture"):
        instance_examples(DataConfig(dataset=str(tmp_path / "saved")))
    with pytest.raises(FinetuneError, match="data.caption_column: .* has no column 'text'"):
        instance_examples(DataConfig(dataset=str(tmp_path / "saved"), image_column="picture", caption_column="text"))
    with pytest.raises(FinetuneError, match="data.dataset and data.instance_dir are both set"):
        instance_examples(DataConfig(dataset=str(tmp_path / "saved"), instance_dir=str(photos)))


def test_imagefolder_with_metadata_trains_through_the_recipe(tiny_sd1, photos, tmp_path, run_cli):
    image_folder(photos, tmp_path / "folder")
    examples = instance_examples(DataConfig(dataset=str(tmp_path / "folder"), caption_column="text",
                                            instance_prompt="a photo of sks cat", trigger="sks cat"))
    assert [e.prompt for e in examples] == ["a photo of sks cat", "sks cat, on a sofa", "sks cat, on a sofa"]
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "data.instance_dir": "", "data.dataset": tmp_path / "folder", "data.caption_column": "text",
        "data.trigger": "sks cat", "prior.num_class_images": 0, "train.max_steps": 2})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    code, _, err = run_cli("train", SD15, *overrides, "data.dataset=./no/such/folder", f"output_dir={tmp_path}/r2")
    assert code == 2 and "data.dataset: folder ./no/such/folder does not exist" in err


def test_an_undecodable_row_is_an_error_naming_it_or_skipped(photos, tmp_path):
    paths = sorted(photos.glob("*.jpg"))[:2]
    rows = [{"bytes": p.read_bytes(), "path": None} for p in paths] + [{"bytes": b"not an image", "path": None}]
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})
                               ).save_to_disk(str(tmp_path / "saved"))
    examples = instance_examples(DataConfig(dataset=str(tmp_path / "saved")))
    with pytest.raises(FinetuneError, match=r"^data.dataset row 2 \('image'\): not a readable image .*"
                                            r"\(or set data.on_bad_image=skip to leave such files out\)$"):
        screen_photos(examples, 64, "error")
    kept, report = screen_photos(examples, 64, "skip")
    assert [e.path for e in kept] == [f"{tmp_path / 'saved'}[0]", f"{tmp_path / 'saved'}[1]"]
    assert report.summary() == "photos: 2 used, 1 skipped"
