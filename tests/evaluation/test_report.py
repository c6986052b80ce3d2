"""What `finetune eval` prints and writes for a hand-made result, warnings included."""
import csv
import io
import json

from finetune.evaluation.report import csv_text, table, write_tables
from finetune.evaluation.runner import summary_text
from finetune.evaluation.scoring import METRICS
from finetune.evaluation.selection import choose_checkpoint


def row(name, step, dino, clip_t):
    return {"checkpoint": name, "step": step, "dino": dino, "clip_i": 0.8, "clip_t": clip_t, "class_dino": 0.3,
            "class_clip_i": 0.6, "class_dino_base": 0.9, "class_clip_i_base": 0.95}


def test_summary_names_the_best_the_warning_and_the_speed_and_files_hold_the_same(tmp_path):
    rows = [row("base", 0, 0.40, 0.30), row("step-000100", 100, 0.60, 0.29), row("step-000200", 200, 0.70, 0.25)]
    verdict = choose_checkpoint(rows[0], rows[1:], 0.02)
    report = {"rows": rows, "best": {"checkpoint": verdict.best, "rule": verdict.rule}, "warnings": verdict.warnings,
              "speed": {"images": 324, "generation_seconds": 30.0, "images_per_second": 10.8, "total_seconds": 41.5,
                        "device": "cuda"}}
    text = summary_text(report, tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "DINO", "CLIP-I", "CLIP-T", "cls-DINO", "cls-CLIP-I",
                                "cls~base-DINO", "cls~base-CLIP-I"]
    assert lines[2].split() == ["step-000100", "*", "100", "0.6000", "0.8000", "0.2900", "0.3000", "0.6000",
                                "0.9000", "0.9500"]
    assert "best: step-000100 (highest DINO among checkpoints with CLIP-T >= 0.2800 (base 0.3000 - 0.02))" in lines
    assert "warning: overfitting from step-000200: DINO rose to 0.7000 (best step-000100: 0.6000) while CLIP-T " \
           "fell to 0.2500, below 0.2800; later checkpoints trade prompt fidelity for likeness" in lines
    assert "generated 324 images in 30.0 s (10.8 images/s on cuda); 41.5 s in all" in lines
    assert table(rows, None).count("*") == 0

    write_tables(tmp_path, report)
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert parsed == list(csv.DictReader(io.StringIO(csv_text(rows, "step-000100"))))
    assert [(r["checkpoint"], r["best"]) for r in parsed] == [("base", "0"), ("step-000100", "1"), ("step-000200", "0")]
    assert [float(parsed[2][key]) for key in METRICS] == [0.7, 0.8, 0.25, 0.3, 0.6, 0.9, 0.95]
