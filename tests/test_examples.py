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
