"""What the commands say and write, as a user sees it: no library noise, no message on a progress bar's line, one
line per phase, the files and the two load lines at the end, file modes that follow the umask, one TensorBoard
run per training run, help that states every default, and defaults that agree everywhere."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from finetune.cli import main
from finetune.config import field_docs
from recipes import dreambooth_lora, sdxl_dreambooth_lora
from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
UMASK = 0o027  # files 0640, folders 0750: not the 022 most machines use, so a mode that ignores it shows
# Progress bars as tqdm draws them: "desc: NN%|bar| n/total [times]" and nothing else on that segment.
BAR = re.compile(r"[\w ()'.-]*: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\] *")
THIRD_PARTY = ("gemm_4bit", "[transformers]", "torchvision", "kept in float32", "No LoRA keys", "Warning:",
               "FutureWarning", "UserWarning", "DeprecationWarning", "Traceback", "LOAD REPORT", "warnings.warn")


class Records(logging.Handler):
    """Every record that reaches the root logger's handlers (after the loggers' filters), with its logger."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def run_captured(args: list, umask: int = UMASK) -> tuple[int, str, str, list[logging.LogRecord]]:
    """`finetune ARGS` in-process under `umask`, with its stdout, stderr and log records."""
    out, err, records = io.StringIO(), io.StringIO(), Records()
    logging.getLogger().addHandler(records)
    previous = os.umask(umask)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.umask(previous)
        logging.getLogger().removeHandler(records)
        from accelerate.state import AcceleratorState, GradientState, PartialState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return code, out.getvalue(), err.getvalue(), records.records


@pytest.fixture(scope="module")
def showcase(tiny_sd1, photos_master, tmp_path_factory):
    """A base model with a model card (license openrail++); class images left at 48 px; a first run, then the same
    folder trained again with train.overwrite=true (validation, kohya file, checkpoints) and resumed at its last
    step; the LoRA fused into one file and used by generate. Everything under UMASK."""
    root = tmp_path_factory.mktemp("showcase")
    base = Path(shutil.copytree(tiny_sd1, root / "base-model"))
    (base / "README.md").write_text("---\nlicense: openrail++\n---\n# a tiny model\n")
    classes = root / "class_images"
    classes.mkdir()
    for i in range(2):
        Image.open(photos_master / f"cat_{i}.jpg").resize((48, 48)).save(classes / f"old-{i}.png")
    common = tiny_overrides(base, photos_master, root, **{"prior.num_class_images": 2, "export.kohya": "true"})
    first = run_captured(["train", SD15, *common, "train.max_steps=2", "train.seed=1"])
    assert first[0] == 0, first[2]
    again = [*common, "train.max_steps=4", "train.overwrite=true", "train.checkpoint_every=2",
             "validation.prompts=[a photo of sks dog, a dog]", "validation.every=2", "validation.steps=2"]
    runs = {"train": run_captured(["train", SD15, *again]),
            "resume": run_captured(["train", SD15, *again[:-3], "train.resume=latest"]),
            "fuse": run_captured(["export", root / "run", "--fuse", "--base", base,
                                  "--out", root / "fused.safetensors"]),
            "generate": run_captured(["generate", "--model", base, "--lora", root / "run", "--prompt", "a dog",
                                      "--num-images", 2, "--steps", 2, "--resolution", 64, "--out", root / "gen"])}
    for name, (code, _, err, _) in runs.items():
        assert code == 0, f"{name}: {err}"
    return root, runs


def segments(text: str) -> list[str]:
    """What a terminal would show as separate pieces: lines, and the redraws within a line (after each \\r)."""
    return [piece for line in text.split("\n") for piece in line.split("\r") if piece.strip()]


@pytest.mark.parametrize("command", ["train", "resume", "generate"])
def test_output_holds_no_library_text_and_no_message_on_a_bar_line(showcase, command):
    _, runs = showcase
    code, out, err, records = runs[command]
    assert not [r.getMessage() for r in records if not r.name.startswith("finetune")]  # all held back
    ours = {line for r in records for line in r.getMessage().splitlines()}
    for piece in segments(err):
        if "%|" in piece:
            assert BAR.fullmatch(piece), f"a message shares a line with a progress bar: {piece!r}"
        else:
            assert piece in ours, f"not a finetune message: {piece!r}"
    assert not any(marker in out + err for marker in THIRD_PARTY)


def test_train_says_each_phase_then_where_the_files_are_and_how_to_load_them(showcase):
    root, runs = showcase
    run = root / "run"
    lines = [r.getMessage() for r in runs["train"][3]]
    seconds = r"(\d+\.\d|\d+|\d+ min \d\d) s"  # console.seconds: 0.4 s, 12 s, 3 min 05 s
    took = rf"\({seconds}\)"
    expected = [rf"start-up and imports: {seconds}",
                rf"loading weights: {root}/base-model loaded {took}",
                rf"class images: 2 images found in {root}/class_images, none to draw {took}",
                # instance, caption of cat_3, class; the photos and class images the 4 steps read
                rf"encoding: 3 prompts encoded; \d images encoded {took}",
                rf"LoRA and optimizer: {seconds}",
                rf"training: 4 steps \(1 to 4\), [\d.]+ it/s after warm-up {took}",
                rf"export: 4 files written {took}",                # diffusers, kohya, card, before/after
                r"done: 4 steps, 0 skipped \(NaN/Inf\); photos: 5 used, 0 skipped"]
    found = [next((i for i, line in enumerate(lines) if re.fullmatch(pattern, line)), None) for pattern in expected]
    assert None not in found, (expected[found.index(None)], "\n".join(lines))
    assert found == sorted(found)  # in the order the phases run, each said once
    assert sum(line.startswith("training: ") for line in lines) == 1
    assert (f"notice: 2 class images of 2 in {root}/class_images are not 64x64 (48x48: 2); they are resized like "
            "photos. To train on class images drawn at 64 px, empty the folder or set data.class_dir to a new one"
            ) in lines
    end = lines[lines.index("done: 4 steps, 0 skipped (NaN/Inf); photos: 5 used, 0 skipped"):]
    listed = [Path(line.split()[0]) for line in end[1:end.index("load the LoRA:")]]
    assert listed == [run / "pytorch_lora_weights.safetensors", run / "run.safetensors", run / "README.md",
                      run / "samples" / "before_after.png", run / "checkpoints" / "step-000004",
                      run / "train_summary.json", run / "logs"]
    assert all(path.exists() for path in listed)
    assert end[-2:] == [f'  diffusers: pipe.load_lora_weights("{run}")',
                        f"  A1111/Forge: copy {run}/run.safetensors to models/Lora/ and add <lora:run:1> to the prompt "
                        "(ComfyUI: models/loras/, a LoraLoader node)"]
    # Resumed at its last step, the run has nothing to train and says so, with no speed ("None it/s").
    resumed = [r.getMessage() for r in runs["resume"][3]]
    assert any(re.fullmatch(r"training: nothing to do, the checkpoint is at step 4 = train.max_steps \(raise "
                            rf"train.max_steps to train further\) \({seconds}\)", line) for line in resumed), resumed
    assert "done: 4 steps (0 this run), 0 skipped (NaN/Inf); photos: 5 used, 0 skipped" in resumed
    assert not any("None" in line for line in resumed)


def test_every_output_follows_the_umask(showcase):
    root, _ = showcase
    outputs = [root / "run", root / "fused.safetensors", root / "gen"]
    paths = [p for out in outputs for p in ([out, *out.rglob("*")] if out.is_dir() else [out])]
    assert len(paths) > 30 and (root / "run" / "run.safetensors") in paths
    wrong = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~UMASK]
    assert not wrong


def test_tensorboard_holds_one_run_with_steps_in_order_after_an_overwrite_and_a_resume(showcase):
    root, _ = showcase
    runs = EventMultiplexer().AddRunsFromDirectory(str(root / "run" / "logs")).Reload()
    assert list(runs.Runs()) == ["dreambooth_lora"]  # no timestamped run beside it
    events = runs.GetAccumulator("dreambooth_lora")
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # the first run's steps 1-2 are gone
    assert [e.step for e in events.Images("validation")] == [2, 4]
    assert events.PluginTagToContent("hparams"), "the config's hyperparameters are not in the run"


def test_model_card_license_comes_from_the_base_model_card(showcase):
    root, _ = showcase
    _, front, body = (root / "run" / "README.md").read_text().split("---\n", 2)
    assert yaml.safe_load(front)["license"] == "openrail++"
    assert "License: not found" not in body


def test_show_config_docs_prints_nothing_but_the_table():
    """In a fresh process, where bitsandbytes and transformers warn while importing."""
    result = subprocess.run([sys.executable, "-m", "finetune", "show-config", "--docs"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines()[0].startswith("model.pretrained ")


def test_generate_with_two_loras_in_a_fresh_process_prints_only_its_own_lines(showcase):
    """Outside pytest's own capture of warnings, where peft warns on the second adapter and the libraries warn at
    import: stderr stays empty, stdout holds generate's two lines."""
    root, _ = showcase
    result = subprocess.run([sys.executable, "-m", "finetune", "generate", "--model", str(root / "base-model"),
                             "--lora", str(root / "run"), "--lora", f"{root / 'run' / 'run.safetensors'}:0.5",
                             "--prompt", "a dog", "--num-images", "1", "--steps", "2", "--out", str(root / "gen2")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines() == ["generated 1/1 images", f"wrote 1 image and grid.png to {root / 'gen2'}"]


def test_train_in_a_fresh_process_prints_only_finetune_lines_and_bars(tiny_sd1, photos, tmp_path):
    """Outside pytest's capture of warnings: every piece of stderr is a progress bar or one of finetune's lines."""
    args = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0, "train.max_steps": 2})
    result = subprocess.run([sys.executable, "-m", "finetune", "train", SD15, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    ours = ("start-up and imports: ", "loading weights: ", "class images: ", "encoding: ", "LoRA and optimizer: ",
            "notice: ", "training: ", "export: ", "done: ", "  ", "load the LoRA:")
    for piece in segments(result.stderr):
        assert BAR.fullmatch(piece) or piece.startswith(ours), f"not a finetune line: {piece!r}"
    assert not any(marker in result.stdout + result.stderr for marker in THIRD_PARTY)


def test_verbose_shows_what_is_held_back(capsys):
    from finetune.console import configure
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    for verbose in (False, True):
        configure(verbose=verbose)
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: test")
        logging.getLogger("finetune").info("notice: ours")
    err = capsys.readouterr().err
    assert err == "notice: ours\nFailed to load CPU gemm_4bit_forward from kernels-community: test\nnotice: ours\n"
    configure()


def help_entries(name: str, capsys) -> list[str]:
    """`finetune NAME --help`, one entry per argument (its name, metavar and help, whitespace folded)."""
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = capsys.readouterr().out
    body = text.split("\n\n", 1)[1]
    return [" ".join(entry.split()) for entry in re.split(r"\n(?=  \S)", body) if entry.startswith("  ")]


@pytest.mark.parametrize("name", ["train", "show-config", "plan", "generate", "eval", "export", "demo"])
def test_help_states_every_default(name, capsys):
    """Each argument that takes a value says its default, or that it is required; flags are off unless given."""
    entries = help_entries(name, capsys)
    flags = {"-h, --help", "-v, --verbose", "--docs", "--fuse", "--overwrite"}
    options = [e for e in entries if e.startswith("-") and not any(e.startswith(flag + " ") for flag in flags)]
    positionals = [e for e in entries if not e.startswith("-")]
    assert options or name in ("train", "show-config")
    for entry in options + [e for e in positionals if e.startswith("overrides") or name == "show-config"]:
        assert re.search(r"\((default|required)[:,)]", entry), entry
    assert all(len(entry.split()) > 2 for entry in positionals), positionals  # each has a help text
    if name == "generate":
        from finetune.cli import GENERATE_DEFAULTS as DEFAULTS
        text = "\n".join(entries)
        assert "--out OUT folder for the PNGs and grid.png (default: generated)" in text
        for option, key in (("--steps", "steps"), ("--seed", "seed"), ("--guidance", "guidance"),
                            ("--num-images", "num_images"), ("--scheduler", "scheduler")):
            entry = next(e for e in entries if e.startswith(option + " "))
            assert f"(default: {DEFAULTS[key]})" in entry, entry


def test_defaults_agree_between_recipes_configs_and_readme():
    """Each shipped config trains for its recipe's default max_steps (unset: derived from the photo count, README's
    "Defaults that fit the photos"); README's config table shows the defaults of the SD recipe as its dataclasses
    hold them."""
    recipes = {"dreambooth_lora": dreambooth_lora.Config(), "sdxl_dreambooth_lora": sdxl_dreambooth_lora.Config()}
    for path in (ROOT / "recipes" / "configs").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if path.name != "demo_tiny.yaml":  # the demo's steps are the demo's own (README, the demo's time)
            assert data["train"].get("max_steps") == recipes[data["recipe"]].train.max_steps, path.name
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `(.*?)` \|", readme, re.M))
    wrong = {key: (rows.get(key), default) for key, default, _ in field_docs(dreambooth_lora.Config)
             if rows.get(key) != default}
    assert not wrong


def test_a_hub_dataset_without_a_network_fails_at_once(tiny_sd1, tmp_path, run_cli, monkeypatch):
    """Not after huggingface_hub's five retries (about 23 s of repeated lines): the failed name lookup says it."""
    import socket

    import huggingface_hub.constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    code, _, err = run_cli("train", SD15, f"model.pretrained={tiny_sd1}", "data.dataset=someone/photos",
                           "data.instance_dir=", f"output_dir={tmp_path / 'run'}", "prior.num_class_images=0")
    assert code == 2 and err.splitlines()[-1] == (
        "finetune: error: data.dataset: someone/photos is read as a Hub dataset name, but the Hub cannot be reached "
        "(huggingface.co: Name or service not known); set HF_HUB_OFFLINE=1 to use a copy in the Hub cache, or give "
        "a local folder")
