"""Every check a training run makes before it writes, deletes or generates anything, and then its first writes.

`validate_run` reads and writes nothing: the folders (apart, writable, not another run's, no file finetune did not
write), the model's files, the resume point (the newest intact checkpoint, whose settings must match this run's),
every photo and caption, the class images an earlier run left, and the LoRA to start from. Only when all of it
is known good does `claim_run` touch the disk: the output folder's lock, leftovers of interrupted saves, damaged
checkpoints moved aside, the earlier run deleted with train.overwrite=true, and broken class images removed so
they are drawn again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from transformers import AutoTokenizer

from ..config import TrainConfig, resolved
from ..data.captions import caption_source, warn_long_prompts
from ..data.class_images import ClassFolderReport, remove_broken_class_images, screen_class_images
from ..data.dataset import Example, instance_examples
from ..data.masks import attach_masks
from ..data.screening import PhotoReport, screen_photos
from ..defaults import with_defaults
from ..errors import FinetuneError
from ..export.adapters import NAMES
from ..export.diffusers_format import WEIGHT_NAME, finetune_metadata
from ..export.embeddings import rewrite_prompt
from ..export.lora_weights import read_lora
from ..family import model_facts, resolve_family
from ..models import describe_source
from .checkpoint import find_checkpoint, resume_point
from .distributed import samples_per_step
from .pivotal import pivotal_word
from .run_dir import check_folders_apart, check_output_dir, claim_output_dir

log = logging.getLogger("finetune")
CLIP_TOKENS = 77  # what every SD 1.x/2.x/XL text encoder reads, start and end tokens included


@dataclasses.dataclass
class CheckedRun:
    resume_from: Path | None        # the checkpoint to load, or None for a fresh run
    start: int                      # optimizer steps already done
    seen: int                       # samples already seen
    instance: list[Example]         # the photos that passed screening
    photos: PhotoReport
    earlier: list[Path]             # the earlier run's step folders (deleted with train.overwrite=true)
    damaged: list[Path]             # newer checkpoints that cannot be resumed from (moved aside)
    class_images: ClassFolderReport
    train: TrainConfig              # cfg.train with max_steps and learning_rate filled in where unset
    chosen: str                     # what was filled in and why (empty when both were given)


def validate_run(cfg, num_processes: int = 1, main_process: bool = True) -> CheckedRun:
    """Check every input of a training run; raise one FinetuneError naming the first problem. Writes nothing."""
    data, train = cfg.data, cfg.train
    dataset = data.dataset if data.dataset and Path(data.dataset).expanduser().exists() else None
    check_folders_apart({"output_dir": cfg.output_dir, "data.instance_dir": data.instance_dir or None,
                         "data.class_dir": data.class_dir if cfg.prior.num_class_images else None,
                         "data.dataset": dataset})
    earlier = check_output_dir(cfg, bool(train.resume), main_process)
    describe_source(cfg.model.pretrained, cfg.model.allow_pickle)
    resume_from, damaged = find_checkpoint(cfg.output_dir, train.resume)
    start, seen = resume_point(resume_from, samples_per_step(train, num_processes))
    if resume_from is not None:
        check_resume_settings(resume_from, cfg)
    if cfg.lora.init_from:
        check_init_lora(cfg.lora, cfg.model)
    instance, photos = screen_photos(instance_examples(data), train.resolution, data.on_bad_image, data.buckets,
                                     data.allow_upscale)
    instance = attach_masks(instance, data)  # data.masks: one per photo, each checked now
    train, chosen = with_defaults(train, cfg.lora.type, len(instance), num_processes)  # needs the photo count
    if resume_from is not None and start > resolved(train.max_steps, "train.max_steps"):
        raise FinetuneError(f"train.resume: {resume_from} is at step {start}, past train.max_steps="
                            f"{train.max_steps}; raise train.max_steps to train on from it")
    if main_process:
        check_prompt_lengths(instance, cfg)
    if cfg.lora.pivotal:
        check_pivotal_word(instance, cfg)
    class_images = screen_class_images(data.class_dir) if cfg.prior.num_class_images else ClassFolderReport()
    return CheckedRun(resume_from, start, seen, instance, photos, earlier, damaged, class_images, train, chosen)


def claim_run(cfg, checked: CheckedRun, main_process: bool = True) -> None:
    """The run's first writes, once validate_run passed (see the module's docstring)."""
    claim_output_dir(cfg.output_dir, checked.earlier, checked.damaged,
                     cfg.train.overwrite and checked.resume_from is None, main_process)
    if main_process:
        remove_broken_class_images(checked.class_images)


def local_model_family(pretrained: str) -> str | None:
    """The family name of a local diffusers folder, from its configs alone (finetune.family); None for anything
    else (a Hub id is read when it loads)."""
    if not (Path(pretrained).expanduser() / "model_index.json").is_file():
        return None
    try:
        return resolve_family(pretrained).name
    except FinetuneError:
        return None


def check_resume_settings(checkpoint: Path, cfg) -> None:
    """The checkpoint can go on under this run's settings: the same adapter type, LoRA shape and targets, a model
    of the same family (from the export the checkpoint holds). Its step against train.max_steps is checked once
    the photos are counted (max_steps may follow from them)."""
    header = finetune_metadata(checkpoint / WEIGHT_NAME) if (checkpoint / WEIGHT_NAME).is_file() else {}
    lora = cfg.lora
    if header:
        header.setdefault("type", "lora")  # exports from before lora.type were LoRA
    for key, ours in (("type", lora.type), ("rank", lora.rank), ("alpha", lora.alpha),
                      ("unet_targets", lora.unet_targets), ("text_encoder", lora.text_encoder)):
        if key not in header:
            continue
        theirs = header[key] if key in ("type", "unet_targets") else json.loads(header[key])
        if theirs != ours:
            shown = json.dumps(theirs) if isinstance(theirs, bool) else theirs
            raise FinetuneError(f"train.resume: {checkpoint} was trained with lora.{key}={shown}, this run sets "
                                f"lora.{key}={json.dumps(ours) if isinstance(ours, bool) else ours}; resume with the "
                                "checkpoint's settings, or start afresh (train.overwrite=true or another output_dir)")
    check_resume_ema(checkpoint, header, cfg.train.ema_decay)
    check_resume_pivotal(checkpoint, header, lora)
    family = local_model_family(cfg.model.pretrained)
    if family and header.get("family") and family != header["family"]:
        raise FinetuneError(f"train.resume: {checkpoint} was trained on {header.get('base_model')} (an "
                            f"{header['family']} model), but model.pretrained={cfg.model.pretrained} is an {family} "
                            "model; resume with the model it was trained on")


def check_resume_ema(checkpoint: Path, header: dict, ema_decay: float) -> None:
    """The checkpoint holds an EMA of the decay this run sets (its export's header says), or none when it sets
    none: a resumed EMA must go on with the recurrence it started with, and one cannot be made up afterwards."""
    theirs = float(json.loads(header.get("ema_decay", "0")))
    if theirs != ema_decay:
        def shown(decay: float) -> str:
            return f"train.ema_decay={decay:g}" if decay else "no EMA (train.ema_decay=0)"
        raise FinetuneError(f"train.resume: {checkpoint} was trained with {shown(theirs)}, this run sets "
                            f"{shown(ema_decay)}; resume with the checkpoint's setting, or start afresh "
                            "(train.overwrite=true or another output_dir)")


def check_resume_pivotal(checkpoint: Path, header: dict, lora) -> None:
    """lora.pivotal on or off and its token count as the checkpoint was trained (its optimizer has a group for the
    tokens, its folder their rows)."""
    if not header:
        return
    theirs = json.loads(header["pivotal_tokens"]) if "pivotal_tokens" in header else None
    if theirs != (lora.pivotal_tokens if lora.pivotal else None):
        said = f"lora.pivotal=true, lora.pivotal_tokens={theirs}" if theirs else "lora.pivotal=false"
        raise FinetuneError(f"train.resume: {checkpoint} was trained with {said}; resume with the checkpoint's "
                            "lora.pivotal settings, or start afresh (train.overwrite=true or another output_dir)")


def check_pivotal_word(instance: list[Example], cfg) -> None:
    """lora.pivotal's word stands in the instance prompts (else its tokens would never train) and not in the
    class prompt (whose images must keep drawing the plain class)."""
    word = pivotal_word(cfg)
    if not any(rewrite_prompt(e.prompt, word, "") != e.prompt for e in instance):
        raise FinetuneError(f"lora.pivotal_word: {word!r} is in none of the instance prompts (e.g. "
                            f"{instance[0].prompt!r}); set lora.pivotal_word to the trigger's identifier word")
    if cfg.prior.num_class_images and rewrite_prompt(cfg.data.class_prompt, word, "") != cfg.data.class_prompt:
        raise FinetuneError(f"data.class_prompt: {cfg.data.class_prompt!r} holds lora.pivotal's word {word!r}; "
                            "the class prompt names the plain class, e.g. 'a photo of dog'")


def check_init_lora(lora, model) -> None:
    """lora.init_from is a readable LoRA file whose type, parts, rank and alpha fit lora.* (its layers are compared
    with the model's once it is loaded); sd-scripts' original-layout SDXL names are read with the base's U-Net
    config."""
    path = lora.init_from
    weights = read_lora(path, model_facts(model).unet_config)
    parts = sorted(weights.layers)
    if weights.kind != lora.type:
        raise FinetuneError(f"lora.init_from: {path} is a {NAMES[weights.kind]} file but this run trains "
                            f"lora.type={lora.type}; set lora.type={weights.kind}")
    if "unet" not in weights.layers or any(name != "unet" for name in parts) != lora.text_encoder:
        wants = "unet and the text encoder" if lora.text_encoder else "unet"
        raise FinetuneError(f"lora.init_from: {path} has LoRA on {', '.join(parts)} but this run trains {wants}; "
                            "set lora.text_encoder to match the file")
    if weights.rank("unet") != lora.rank:
        raise FinetuneError(f"lora.init_from: {path} has rank {weights.rank('unet')} on unet; set "
                            f"lora.rank={weights.rank('unet')}")
    if abs(weights.alpha["unet"] - lora.alpha) > 1e-6:
        raise FinetuneError(f"lora.init_from: {path} has alpha {weights.alpha['unet']:g} on unet; set "
                            f"lora.alpha={weights.alpha['unet']:g}")


def check_prompt_lengths(instance: list[Example], cfg) -> None:
    """Warn about captions (and the instance prompt) longer than the text encoder reads, naming each file."""
    sources: dict[str, str] = {}
    for example in instance:
        found = caption_source(Path(example.path), cfg.data.caption_extension) if example.loader is None else None
        where = str(found[0]) if found else (f"{example.path}'s caption" if example.loader else
                                             "data.instance_prompt")
        sources.setdefault(where, example.prompt)
    # Each token covers at least one byte of UTF-8: prompts this short cannot be too long, no tokenizer needed.
    if not sources or max(len(p.encode()) for p in sources.values()) + 2 <= CLIP_TOKENS:
        return
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is not None:
        warn_long_prompts(sources, tokenizer)


def load_tokenizer(model):
    """The model's (first) tokenizer alone, without its weights; None where it cannot be had cheaply."""
    single_file = describe_source(model.pretrained, model.allow_pickle) == "file"
    source = model.single_file_config if single_file else model.pretrained
    if not source:
        log.info("caption lengths not checked: a single-file model without model.single_file_config")
        return None
    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer",
                                             revision=None if single_file else model.revision)
    except Exception as exc:  # noqa: BLE001 - offline, or no tokenizer folder: loading the model will say why
        log.info("caption lengths not checked: no tokenizer from %s (%s)", source, type(exc).__name__)
        return None
