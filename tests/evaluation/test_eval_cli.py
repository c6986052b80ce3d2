"""`finetune eval` on a tiny trained run with three checkpoints: the table, the plot, the sheets, the best one."""
import csv
import json

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTModel

from finetune.data.images import list_images, open_rgb
from finetune.evaluation.scoring import METRICS
from finetune.evaluation.selection import choose_checkpoint
from finetune.evaluation.sheets import HEADER, LABEL_WIDTH
from tests.evaluation.conftest import SD15, eval_overrides

CHECKPOINTS = ["step-000001", "step-000002", "step-000003"]


@pytest.fixture(scope="module")
def evaluated(eval_run, photos_master, tiny_clip, tiny_dino):
    """`finetune eval RUN` once; the tests read what it printed and wrote."""
    import contextlib
    import io

    from finetune.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", str(eval_run), *eval_overrides(photos_master, tiny_clip, tiny_dino)])
    assert code == 0, err.getvalue()
    return eval_run / "eval", out.getvalue(), err.getvalue()


def test_eval_writes_the_table_csv_plot_and_sheets_and_names_a_best_checkpoint(evaluated):
    folder, printed, _ = evaluated
    report = json.loads((folder / "metrics.json").read_text())
    rows = report["rows"]
    assert [r["checkpoint"] for r in rows] == ["base", *CHECKPOINTS] and [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(-1 <= r[key] <= 1 for r in rows for key in METRICS)
    assert rows[0]["class_dino_base"] == pytest.approx(1.0) and rows[0]["class_clip_i_base"] == pytest.approx(1.0)
    assert any(r["dino"] != rows[0]["dino"] for r in rows[1:])  # the LoRA changed what is drawn
    # the best is the documented rule applied to the written numbers
    verdict = choose_checkpoint(rows[0], rows[1:], report["protocol"]["max_clip_t_drop"])
    assert report["best"] == {"checkpoint": verdict.best, "rule": verdict.rule} and verdict.best in CHECKPOINTS
    assert report["protocol"]["prompts"] == ["a sks cat in the jungle", "a red sks cat"]
    assert report["protocol"]["clip_t_texts"] == ["a cat in the jungle", "a red cat"]
    assert report["protocol"]["class_prompt"] == "a photo of a cat"
    assert report["speed"]["images"] == 4 * (2 + 2) and report["speed"]["images_per_second"] > 0

    with open(folder / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["checkpoint"] for r in table] == ["base", *CHECKPOINTS]
    assert all(float(t[key]) == pytest.approx(r[key], abs=1e-6) for t, r in zip(table, rows) for key in METRICS)
    assert [r["checkpoint"] for r in table if r["best"] == "1"] == [verdict.best]

    assert Image.open(folder / "metrics.png").size == (980, 560)
    assert sorted(p.name for p in (folder / "sheets").iterdir()) == [f"{n}.png" for n in ["base", *CHECKPOINTS]]
    assert Image.open(folder / "sheets" / "base.png").size == (LABEL_WIDTH + 64, HEADER + 2 * 64)

    lines = printed.splitlines()
    assert lines[0].split()[:5] == ["checkpoint", "step", "DINO", "CLIP-I", "CLIP-T"]
    assert lines[1].split()[:2] == ["base", "0"] and f"{rows[0]['dino']:.4f}" in lines[1]
    assert any(line.startswith(f"{verdict.best} *") for line in lines[2:5])
    assert f"best: {verdict.best} (" in printed and "images/s on cpu" in printed


def test_dino_recomputed_from_the_sheet_with_transformers_alone(evaluated, photos_master, tiny_dino):
    """Oracle: the base model's images cut from its sheet (64 px cells hold them unscaled, PNG is lossless),
    embedded by ViTModel directly, averaged over every (image, photo) pair."""
    folder, _, _ = evaluated
    sheet = Image.open(folder / "sheets" / "base.png").convert("RGB")
    drawn = [sheet.crop((LABEL_WIDTH, HEADER + 64 * p, LABEL_WIDTH + 64, HEADER + 64 * (p + 1))) for p in range(2)]
    photos = [open_rgb(p) for p in list_images(photos_master, "photos")]
    model, processor = ViTModel.from_pretrained(tiny_dino).eval(), AutoImageProcessor.from_pretrained(tiny_dino)
    with torch.no_grad():
        cls = model(**processor(images=drawn + photos, return_tensors="pt")).last_hidden_state[:, 0].double()
    cls = cls / cls.norm(dim=1, keepdim=True)
    expected = (cls[:2] @ cls[2:].T).mean().item()
    assert json.loads((folder / "metrics.json").read_text())["rows"][0]["dino"] == pytest.approx(expected, abs=1e-5)


def test_an_earlier_evaluation_is_kept_unless_overwrite(evaluated, eval_run, photos_master, tiny_clip, tiny_dino,
                                                        run_cli):
    folder, _, _ = evaluated
    before = (folder / "metrics.json").read_bytes()
    code, _, err = run_cli("eval", eval_run, *eval_overrides(photos_master, tiny_clip, tiny_dino))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"finetune: error: {folder} holds an earlier evaluation (metrics.json); pass --overwrite")
    assert (folder / "metrics.json").read_bytes() == before


def test_one_lora_file_evaluates_alone_with_the_same_numbers(evaluated, eval_run, photos_master, tiny_clip, tiny_dino,
                                                             run_cli):
    """A LoRA file instead of a run: its header names the base model, trigger and step; the seeds are the same, so
    its row equals that checkpoint's row in the run's evaluation. The results go beside it."""
    lora = eval_run / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"
    overrides = eval_overrides(photos_master, tiny_clip, tiny_dino)
    # the training YAML names the real SD1.5 on the Hub: the header's base model (the tiny one) wins over it, and
    # overrides may come before and after the options
    code, out, err = run_cli("eval", lora, *overrides[:2], "--config", SD15, *overrides[2:])
    assert code == 0, err
    rows = json.loads((lora.parent / "pytorch_lora_weights-eval" / "metrics.json").read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == ["base", "step-000002"]
    assert rows == [json.loads((evaluated[0] / "metrics.json").read_text())["rows"][i] for i in (0, 2)]


def test_an_offline_hub_model_stops_before_anything_is_drawn(eval_run, photos_master, tiny_clip, tmp_path, run_cli):
    out = tmp_path / "offline"
    code, _, err = run_cli("eval", eval_run, *eval_overrides(photos_master, tiny_clip, "facebook/dino-vits16"),
                           "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert "eval.dino_model: facebook/dino-vits16 is neither a folder here nor in the local Hugging Face cache" in err
    assert "set eval.dino_model=models/dino-vits16" in err
    assert not (out / "metrics.json").exists() and not (out / "sheets").exists()


def test_eval_prints_no_library_text_and_its_pngs_hold_their_parameters(evaluated, eval_run):
    """Issue 18: eval's console holds only finetune's lines; every PNG it writes carries A1111's `parameters` and
    the `finetune` JSON; each sheet's legend names its checkpoint's step and LoRA scale."""
    folder, _, err = evaluated
    # Only eval's own line per checkpoint: no transformers load report (DINO's pooler), no warning of any library.
    assert [line.split(": DINO ")[0] for line in err.splitlines()] == ["base", *CHECKPOINTS], err
    sheet = Image.open(folder / "sheets" / "step-000002.png")
    record = json.loads(sheet.text["finetune"])
    lora = eval_run / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"
    assert record["step"] == 2 and record["loras"] == [{"path": str(lora.resolve()), "scale": 1.0}]
    assert [(c["prompt"], c["seed"]) for c in record["grid"]] == [("a sks cat in the jungle", 0), ("a red sks cat", 0)]
    assert sheet.text["parameters"].startswith("a sks cat in the jungle <lora:")
    assert "Steps: 1, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 64x64" in sheet.text["parameters"]
    assert "<lora:" not in Image.open(folder / "sheets" / "base.png").text["parameters"]
    plot = Image.open(folder / "metrics.png")
    assert json.loads(plot.text["finetune"])["protocol"]["prompts"] == ["a sks cat in the jungle", "a red sks cat"]
    assert "Steps: 1" in plot.text["parameters"]
