"""The example scripts run as a user would run them."""
import runpy
import sys
from pathlib import Path

from PIL import Image

from tests.helpers import tiny_overrides

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_train_from_python_then_generate_with_plain_diffusers(tiny_sd1, photos, tmp_path, monkeypatch, capsys):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0})
    run_example("train_from_python.py", ["recipes/configs/sd15_dreambooth_lora.yaml", *overrides], monkeypatch)
    assert "after 4 steps" in capsys.readouterr().out
    run_example("generate_with_lora.py", [tiny_sd1, tmp_path / "run", "a photo of sks dog", tmp_path / "x.png"],
                monkeypatch)
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_edit_with_lora_draws_moves_and_places_the_subject(tiny_sd1, trained_sd1, tmp_path, monkeypatch, capsys):
    import numpy as np
    photo = Image.effect_mandelbrot((64, 64), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 24, 40, 56))
    photo.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    run_example("edit_with_lora.py", [tiny_sd1, trained_sd1, tmp_path / "photo.png", tmp_path / "mask.png",
                                      "a photo of sks dog", tmp_path / "out", 4], monkeypatch)
    assert "wrote drawn.png, moved.png, placed.png" in capsys.readouterr().out
    drawn, moved, placed = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png"), dtype=float)
                            for n in ("drawn", "moved", "placed"))
    assert drawn.shape == moved.shape == placed.shape == (64, 64, 3)
    inside, original = np.asarray(mask) > 0, np.asarray(photo, dtype=float)
    assert np.abs(placed - original)[~inside].max() == 0 and np.abs(placed - original)[inside].mean() > 5
