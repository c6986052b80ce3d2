"""Photo decoding: orientation, modes, crops, captions, and folder errors."""
import numpy as np
import pytest
from PIL import Image

from finetune.data.images import list_images, open_rgb, read_caption, resize_and_crop, to_image, to_tensor
from finetune.errors import FinetuneError


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = open_rgb(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[5, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize("mode, value", [("L", 128), ("CMYK", (0, 0, 0, 0)), ("RGBA", (10, 20, 30, 255)),
                                         ("I;16", 65535), ("P", 3), ("LA", (50, 255))])
def test_any_mode_becomes_8bit_rgb(tmp_path, mode, value):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (16, 16), value).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    if mode == "I;16":
        assert np.asarray(image).min() == 255  # full-scale 16-bit white stays white, not clipped garbage


def test_transparent_pixels_go_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(open_rgb(tmp_path / "clear.png")).min() == 255


def test_not_an_image_is_a_one_line_error(tmp_path):
    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(FinetuneError, match=r"fake.png: not a readable image"):
        open_rgb(tmp_path / "fake.png")


def test_resize_and_crop_covers_then_crops():
    image = Image.new("RGB", (300, 100))
    crop, (top, left) = resize_and_crop(image, 64, 64)
    assert crop.size == (64, 64) and top == 0 and left == round((192 - 64) / 2)
    crop, (top, left) = resize_and_crop(image, 64, 64, top_left=(0.0, 0.0))
    assert (top, left) == (0, 0)


def test_tensor_round_trip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 8, 8) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(to_image(tensor)), np.asarray(image))


def test_caption_files(tmp_path):
    (tmp_path / "a.jpg").touch()
    (tmp_path / "a.txt").write_text("  a photo of sks dog on a beach \n")
    assert read_caption(tmp_path / "a.jpg", ".txt") == "a photo of sks dog on a beach"
    assert read_caption(tmp_path / "b.jpg", ".txt") is None
    (tmp_path / "c.jpg").touch()
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(FinetuneError, match="c.txt: caption is not UTF-8"):
        read_caption(tmp_path / "c.jpg", ".txt")


def test_folder_errors(tmp_path):
    with pytest.raises(FinetuneError, match="data.instance_dir: folder .* does not exist"):
        list_images(tmp_path / "nope", "data.instance_dir")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(FinetuneError, match="has no photos"):
        list_images(tmp_path, "data.instance_dir")
    for name in ("b.PNG", "a.jpg", "c.webp", "d.jpeg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert [p.name for p in list_images(tmp_path, "k")] == ["a.jpg", "b.PNG", "c.webp", "d.jpeg"]
