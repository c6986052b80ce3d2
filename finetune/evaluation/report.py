"""The evaluation's table: printed, and written as eval/metrics.json and eval/metrics.csv."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .scoring import METRICS

HEADINGS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "class_dino": "cls-DINO",
            "class_clip_i": "cls-CLIP-I", "class_dino_base": "cls~base-DINO", "class_clip_i_base": "cls~base-CLIP-I"}


def table(rows: list[dict], best: str | None) -> str:
    """A fixed-width table, one row per checkpoint (the base model first), the best marked with *."""
    columns = ["checkpoint", "step", *HEADINGS.values()]
    widths = [max(12, len(columns[0])), 6] + [max(7, len(h)) for h in HEADINGS.values()]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    for row in rows:
        name = row["checkpoint"] + (" *" if row["checkpoint"] == best else "")
        cells = [name, str(row["step"])] + [f"{row[key]:.4f}" for key in HEADINGS]
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def legend() -> str:
    return "\n".join(f"  {HEADINGS[key]}: {doc}" for key, doc in METRICS.items())


def csv_text(rows: list[dict], best: str | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["checkpoint", "step", *METRICS, "best"])
    for row in rows:
        writer.writerow([row["checkpoint"], row["step"], *(f"{row[key]:.6f}" for key in METRICS),
                         int(row["checkpoint"] == best)])
    return out.getvalue()


def write_tables(folder: Path, report: dict) -> list[Path]:
    """metrics.csv, then metrics.json (the complete record: protocol, rows, best, warnings, speed)."""
    best = report["best"]["checkpoint"] if report.get("best") else None
    paths = [folder / "metrics.csv", folder / "metrics.json"]
    paths[0].write_text(csv_text(report["rows"], best), encoding="utf-8")
    paths[1].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return paths
