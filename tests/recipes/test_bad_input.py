"""Every kind of bad input through the CLI: a one-line error naming the file or key (exit 2, nothing lost), a
warning and a counted skip, or a photo that is simply read right."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.export.diffusers_format import finetune_metadata
from tests.helpers import tiny_overrides
from tests.test_bad_input_corpus import decompression_bomb

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
SAFE_SUFFIXES = {".safetensors", ".json", ".txt", ".png", ".md"}


def photo(size=(96, 96), mode="RGB", color=(200, 120, 40)) -> Image.Image:
    array = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    return image if mode == "RGB" else Image.new(mode, size, color)


def truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    photo().save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    photo((96, 64)).save(path, exif=exif.tobytes())


def palette_with_transparency(path: Path) -> None:
    image = photo().convert("P")
    image.save(path, transparency=0)


BAD_PHOTOS = {  # file name -> writer; each is an error by default and a counted skip with data.on_bad_image=skip
    "truncated.jpg": truncated_jpeg,
    "empty.jpg": lambda p: p.write_bytes(b""),
    "notes.png": lambda p: p.write_text("this is text, not a picture"),
    "sliver.png": lambda p: Image.new("RGB", (1, 10000), "gray").save(p),
    "bomb.png": decompression_bomb,  # 20000 x 20000 pixels claimed in a few bytes: Pillow refuses it
    "gone.jpg": lambda p: p.symlink_to(p.with_name("moved-away.jpg")),  # a broken symbolic link
}
LONG_CAPTION = "a photo of sks dog, " + ", ".join(f"detail {i}" for i in range(40))
ODD_BUT_FINE = {  # read correctly and trained on
    "cmyk.jpg": lambda p: photo(mode="CMYK", color=(0, 50, 100, 0)).save(p),
    "sixteen.png": lambda p: Image.fromarray(np.full((96, 96), 40000, dtype=np.uint16)).save(p),
    "palette.png": palette_with_transparency,
    "rgba.png": lambda p: photo(mode="RGBA", color=(10, 20, 30, 128)).save(p),
    "grey.png": lambda p: photo(mode="L", color=90).save(p),
    "rotated.jpg": exif_rotated,
    "small.png": lambda p: photo((32, 32)).save(p),  # below train.resolution=64: upscaled, with a warning
    "bitmap.bmp": lambda p: (photo().save(p), p.with_suffix(".txt").write_bytes(  # a caption Notepad saved
        "\ufeffa bmp photo of sks dog".encode("utf-8"))),
    "scan.tiff": lambda p: (photo().save(p), p.with_suffix(".txt").write_text(LONG_CAPTION)),
    "._cat_0.jpg": lambda p: p.write_bytes(b"\0\x05\x16\x07 macOS AppleDouble"),  # not a photo: ignored
}


def fresh_run(tiny_sd1, photos, tmp_path, **extra):
    return tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0, "train.max_steps": 1, **extra})


@pytest.mark.parametrize("name", BAD_PHOTOS)
def test_a_bad_photo_is_a_one_line_error_naming_it(tiny_sd1, photos, tmp_path, run_cli, name):
    BAD_PHOTOS[name](photos / name)
    code, _, err = run_cli("train", SD15, *fresh_run(tiny_sd1, photos, tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"finetune: error: {photos / name}: ")
    assert "data.on_bad_image=skip" in err and os.path.lexists(photos / name)
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_bad_photos_are_skipped_and_counted_with_on_bad_image_skip(tiny_sd1, photos, tmp_path, run_cli, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    for name, write in BAD_PHOTOS.items():
        write(photos / name)
    code, _, err = run_cli("train", SD15, *fresh_run(tiny_sd1, photos, tmp_path, **{"data.on_bad_image": "skip"}))
    assert code == 0, err
    for name in BAD_PHOTOS:
        assert f"warning: skipping {photos / name}: " in caplog.text
    assert "photos: 5 used, 6 skipped" in caplog.text
    assert all(os.path.lexists(p) for p in photos.iterdir()) and len(list(photos.iterdir())) == 12  # none deleted


def test_odd_photos_are_read_right_and_small_ones_counted(tiny_sd1, photos, tmp_path, run_cli, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    for name, write in ODD_BUT_FINE.items():
        write(photos / name)
    code, _, err = run_cli("train", SD15, *fresh_run(tiny_sd1, photos, tmp_path))
    assert code == 0, err
    assert f"{photos / 'small.png'} is 32x32, smaller than train.resolution=64; it is upscaled" in caplog.text
    assert "photos: 14 used, 0 skipped, 1 upscaled" in caplog.text  # BMP and TIFF read; ._cat_0.jpg not a photo
    assert "skipping" not in caplog.text and "ignoring" not in caplog.text
    # The tiny model's tokenizer has no merges: one token per character but spaces, plus start and end.
    tokens = len(LONG_CAPTION.replace(" ", "")) + 2
    assert (f"warning: {photos / 'scan.txt'}: the prompt is {tokens} tokens, but the text encoder reads 77 (with its "
            "start and end tokens); the rest is cut off: shorten it") in caplog.text
    tags = json.loads(finetune_metadata(tmp_path / "run" / "pytorch_lora_weights.safetensors")["tag_frequency"])
    assert tags["instance"]["a bmp photo of sks dog"] == 1  # the byte-order mark is not part of the caption


def write_file(path: Path) -> Path:
    path.write_text("a regular file")
    return path


@pytest.mark.parametrize("change, message", [
    ({"data.instance_dir": "{tmp}/missing"}, "data.instance_dir: folder {tmp}/missing does not exist"),
    ({"data.instance_dir": "{tmp}/empty"}, "data.instance_dir: {tmp}/empty has no photos"),
    ({"caption": "latin-1"}, "{photos}/cat_0.txt: caption is not UTF-8 text; re-save it as UTF-8"),
    ({"train.max_step": "3"}, "unknown config key train.max_step; did you mean train.max_steps?"),
    ({"train.max_steps": "many"}, "train.max_steps: expected a whole number, got 'many'"),
    ({"train.max_steps": "-5"}, "train.max_steps: must be at least 1"),
    ({"model.pretrained": "{tmp}/no-such-model"}, "model.pretrained: {tmp}/no-such-model does not exist"),
    ({"model.pretrained": "{tmp}/model.ckpt"}, "model.pretrained: {tmp}/model.ckpt is a pickle file"),
    ({"output_dir": "{tmp}/a-file/run"}, "output_dir: cannot write to {tmp}/a-file/run (Not a directory)"),
])
def test_bad_paths_and_config_are_one_line_errors(tiny_sd1, photos, tmp_path, run_cli, change, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    write_file(tmp_path / "a-file")
    overrides = fresh_run(tiny_sd1, photos, tmp_path)
    if change.pop("caption", None):
        (photos / "cat_0.txt").write_bytes("un chat à la plage".encode("latin-1"))
    overrides += [f"{k}={v.format(tmp=tmp_path)}" for k, v in change.items()]
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("finetune: error: " + message.format(tmp=tmp_path, photos=photos)), err
    assert (tmp_path / "a-file").read_text() == "a regular file"


def test_a_finished_run_is_not_overwritten_unless_asked(tiny_sd1, photos, tmp_path, run_cli):
    overrides = fresh_run(tiny_sd1, photos, tmp_path, **{"train.keep_checkpoints": 1})
    assert run_cli("train", SD15, *overrides)[0] == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints")  # only the finished export is left
    export = (run / "pytorch_lora_weights.safetensors").read_bytes()
    code, _, err = run_cli("train", SD15, *overrides, "train.seed=1")
    assert code == 2 and err == (f"finetune: error: output_dir {run} holds a finished run's export "
                                 "(pytorch_lora_weights.safetensors); pass train.resume=latest to continue it, "
                                 "train.overwrite=true to replace it, or choose another output_dir\n")
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == export
    code, _, err = run_cli("train", SD15, *overrides, "train.seed=1", "train.overwrite=true")
    assert code == 0, err
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() != export


def pickle_copy(model: Path, dest: Path) -> Path:
    """The tiny model with every weight file as a torch pickle (.bin) instead of safetensors."""
    shutil.copytree(model, dest)
    names = {"diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
             "model.safetensors": "pytorch_model.bin"}
    for path in list(dest.rglob("*.safetensors")):
        torch.save(load_file(path), path.with_name(names[path.name]))
        path.unlink()
    return dest


def test_pickle_weights_need_allow_pickle_and_exports_hold_no_pickles(tiny_sd1, photos, tmp_path, run_cli):
    model = pickle_copy(tiny_sd1, tmp_path / "pickled-model")
    overrides = fresh_run(tiny_sd1, photos, tmp_path, **{"model.pretrained": model, "train.max_steps": 2,
                                                         "train.checkpoint_every": 1})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and err.startswith(f"finetune: error: model.pretrained: {model}/text_encoder has only pickle "
                                        "weights"), err
    assert "model.allow_pickle=true" in err
    code, _, err = run_cli("train", SD15, *overrides, "model.allow_pickle=true")
    assert code == 0, err
    run = tmp_path / "run"
    exported = [p for p in run.iterdir() if p.is_file()] + list(run.glob("checkpoints/*/pytorch_lora_weights.*"))
    assert {p.suffix for p in exported} <= SAFE_SUFFIXES, exported
    for path in exported:
        if path.suffix == ".safetensors":
            assert load_file(path)
