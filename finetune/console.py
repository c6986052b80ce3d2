"""What a command prints: our notices (and, in train, one line per phase: finetune.training.summary.PhaseClock) on
stderr, never on a progress bar's line, and the libraries' warnings that do not concern the user's run held back
(`--verbose` shows everything).

Every log record, ours and the libraries', goes through one handler on the root logger; the CLI wraps a command in
tqdm's `logging_redirect_tqdm`, which writes records through `tqdm.write`: a live bar is cleared, the line
printed, and the bar drawn again below it.
"""
from __future__ import annotations

import logging
import re
import sys

log = logging.getLogger("finetune")

# Library messages that never concern a finetune run: (logger that emits it, start of the message, why not).
IRRELEVANT = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "an optional CPU kernel for 4-bit matmuls, tried at import; finetune quantizes (model.quantize_unet) on CUDA "
     "only"),
    ("transformers.utils.import_utils", re.compile(r"`\w+ImageProcessor` requires torchvision"),
     "the pipelines' image processors (safety checker, IP-adapter) are not used; the Pillow one loads instead"),
    ("diffusers.models.modeling_utils", re.compile(r"There are modules in \w+ that should be kept in float32: \[\]"),
     "said on every dtype cast, here with an empty list: no module of the model needs float32"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to",
     "loading a LoRA trained without text-encoder LoRA (lora.text_encoder=false): it has no such keys by design"),
    ("py.warnings", re.compile(r".*UserWarning: Already found a `peft_config` attribute in the model"),
     "peft's warning on a second adapter: generate loads each --lora as its own adapter, several by design"),
]
# Libraries whose own INFO chatter (loading, device placement) is not ours to print; warnings still show.
LIBRARIES = ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "huggingface_hub",
             "torch")


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `start` (a string or a compiled pattern)."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if isinstance(self.start, str):
            return not message.startswith(self.start)
        return not self.start.match(message)


class _State:
    handler: logging.Handler | None = None
    filters: list[tuple[logging.Logger, logging.Filter]] = []


def configure(verbose: bool = False) -> logging.Handler:
    """One stderr handler on the root logger for every record (ours at INFO; the libraries' at WARNING, or INFO
    with `verbose`); the IRRELEVANT messages dropped unless `verbose`. Call again to reconfigure: the previous
    handler and filters are removed first, so in-process callers (tests) do not stack them."""
    root = logging.getLogger()
    if _State.handler is not None:
        root.removeHandler(_State.handler)
    for logger, dropped in _State.filters:
        logger.removeFilter(dropped)
    _State.filters = []
    handler = logging.StreamHandler(sys.stderr)  # the stream of the moment: pytest's capture swaps it per test
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    _State.handler = handler
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    log.setLevel(logging.INFO)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for name, start, _ in IRRELEVANT:
            logger, dropped = logging.getLogger(name), DropMessage(start)
            logger.addFilter(dropped)
            _State.filters.append((logger, dropped))
    logging.captureWarnings(True)  # warnings.warn goes through the handler too, so it never lands on a bar
    route_library_logging(verbose)
    return handler


def route_library_logging(verbose: bool) -> None:
    """diffusers and transformers print through handlers of their own (not tqdm-aware); send their records to the
    root handler instead, at their usual level (WARNING) or INFO with --verbose, and keep their loading bars off."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.set_verbosity(logging.INFO if verbose else logging.WARNING)
        library.disable_progress_bar()


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 image', '4 images', '0 images'."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def seconds(elapsed: float) -> str:
    """A duration for people: '0.4 s', '12 s', '3 min 05 s'."""
    if elapsed < 10:
        return f"{elapsed:.1f} s"
    if elapsed < 60:
        return f"{elapsed:.0f} s"
    minutes, rest = divmod(round(elapsed), 60)
    return f"{minutes} min {rest:02d} s"


def brief(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line for a one-line error: whole, or when longer than `limit` cut after its last
    sentence that fits (else at a word boundary, with '...'); never mid-word."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    head = line[:limit + 1]
    sentence_end = head.rfind(". ")
    if sentence_end >= limit // 2:
        return head[:sentence_end + 1]
    return head.rsplit(" ", 1)[0].rstrip(",;:") + " ..."
