"""Pivotal tuning's token embeddings as files: diffusers' textual-inversion layout, the UIs' embedding file, and
the kohya LoRA file's bundled embeddings; and back into a diffusers pipeline for generating.

What each client reads (checked against their sources):
- diffusers (`load_textual_inversion`, as its advanced DreamBooth script's README loads its `_emb.safetensors`):
  one file with `clip_l` (and for SDXL `clip_g`) holding (tokens, width) each, loaded once per text encoder
  with `token=["<s0>", "<s1>", ...]` and that encoder and tokenizer.
- AUTOMATIC1111 / ComfyUI embeddings folder: a file named after the word typed in the prompt; SD 1.x/2.x:
  `emb_params` (sd-scripts' layout; A1111 reads any one-tensor file, ComfyUI the first tensor), SDXL: `clip_l` and
  `clip_g` (A1111's SDXL branch, ComfyUI's per-encoder embedding keys).
- Bundled in the kohya LoRA (sd-scripts' "bundled embeddings"; A1111's Lora extension `networks.py` and ComfyUI's
  `sd1_clip.bundled_embed`): `bundle_emb.<word>.string_to_param.*` for SD 1.x/2.x, `bundle_emb.<word>.clip_l` and
  `bundle_emb.<word>.clip_g` for SDXL; the word is then the prompt word in the UI.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import FinetuneError
from ..storage import save_safetensors_atomically

EMBEDDINGS_NAME = "embeddings.safetensors"  # the diffusers-layout file, beside pytorch_lora_weights.safetensors
UI_FOLDER = "embeddings"                     # the UIs' file: embeddings/<word>.safetensors
KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # pipeline slot -> key in the files
BUNDLE = "bundle_emb."
HEADER_TOKENS, HEADER_WORD = "finetune.pivotal_tokens", "finetune.pivotal_word"


@dataclasses.dataclass
class TokenEmbeddings:
    """New tokens standing for one prompt word, with one (tokens, width) matrix per text encoder."""
    word: str                          # the word prompts use, e.g. sks
    tokens: list[str]                  # the tokens it becomes, e.g. ["<s0>", "<s1>"]
    vectors: dict[str, torch.Tensor]   # pipeline slot ('text_encoder', 'text_encoder_2') -> (tokens, width)

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.vectors


def token_names(count: int) -> list[str]:
    """<s0>, <s1>, ...: the names diffusers' advanced DreamBooth script gives its inserted tokens."""
    return [f"<s{i}>" for i in range(count)]


def rewrite_prompt(prompt: str, word: str, replacement: str) -> str:
    """Every whole-word `word` in `prompt` replaced (not inside another word or a <token>)."""
    return re.sub(rf"(?<![\w<]){re.escape(word)}(?![\w>])", replacement, prompt)


def save_embeddings(folder: str | Path, embeddings: TokenEmbeddings, info: dict | None = None) -> list[Path]:
    """folder/embeddings.safetensors (diffusers) and folder/embeddings/<word>.safetensors (A1111, ComfyUI)."""
    folder = Path(folder)
    tensors = {KEYS[slot]: vectors.detach().float().cpu().contiguous()
               for slot, vectors in embeddings.vectors.items()}
    header = {HEADER_TOKENS: json.dumps(embeddings.tokens), HEADER_WORD: embeddings.word,
              **{f"finetune.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (info or {}).items()}}
    written = [save_safetensors_atomically(tensors, folder / EMBEDDINGS_NAME, header)]
    ui = dict(tensors) if embeddings.is_sdxl else {"emb_params": tensors["clip_l"]}
    written.append(save_safetensors_atomically(ui, folder / UI_FOLDER / f"{embeddings.word}.safetensors", header))
    return written


def bundle_tensors(embeddings: TokenEmbeddings, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya file's bundled-embedding keys for these embeddings."""
    prefix = f"{BUNDLE}{embeddings.word}."
    if embeddings.is_sdxl:
        return {prefix + KEYS[slot]: v.detach().to(dtype).cpu().contiguous()
                for slot, v in embeddings.vectors.items()}
    return {prefix + "string_to_param.*": embeddings.vectors["text_encoder"].detach().to(dtype).cpu().contiguous()}


def read_embeddings(path: str | Path) -> TokenEmbeddings:
    """Our diffusers-layout embeddings file."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
        tokens, word = json.loads(header[HEADER_TOKENS]), header[HEADER_WORD]
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise FinetuneError(f"{path}: not an embeddings file finetune wrote ({type(exc).__name__}: "
                            f"{str(exc)[:100]})") from None
    slots = {key: slot for slot, key in KEYS.items()}
    vectors = {slots[key]: value.float() for key, value in tensors.items() if key in slots}
    if "text_encoder" not in vectors or any(v.shape[0] != len(tokens) for v in vectors.values()):
        raise FinetuneError(f"{path}: its tensors do not match its {len(tokens)} tokens; re-export the run")
    return TokenEmbeddings(word, tokens, vectors)


def split_bundled(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[TokenEmbeddings]]:
    """(a kohya file's LoRA tensors, its bundled embeddings), the embeddings named token_names per word."""
    rest = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE)}
    words: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE):
            word, _, part = key[len(BUNDLE):].partition(".")
            words.setdefault(word, {})[part] = value.float()
    found = []
    for word, parts in sorted(words.items()):
        if "string_to_param.*" in parts:
            vectors = {"text_encoder": parts["string_to_param.*"]}
        else:
            vectors = {slot: parts[key] for slot, key in KEYS.items() if key in parts}
        if "text_encoder" in vectors:
            found.append(TokenEmbeddings(word, token_names(vectors["text_encoder"].shape[0]), vectors))
    return rest, found


def embeddings_for(lora_path: str | Path) -> list[TokenEmbeddings]:
    """The embeddings that go with a LoRA: a run folder's (or a diffusers file's neighbour) embeddings file, or
    those bundled in a kohya file. Empty for a LoRA without any."""
    path = Path(lora_path)
    beside = path / EMBEDDINGS_NAME if path.is_dir() else path.with_name(EMBEDDINGS_NAME)
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            bundled = [k for k in handle.keys() if k.startswith(BUNDLE)]
        if bundled:
            return split_bundled(load_file(path))[1]
    if beside.is_file() and (path.is_dir() or path.name == "pytorch_lora_weights.safetensors"):
        return [read_embeddings(beside)]
    return []


def load_into_pipeline(pipe, embeddings: TokenEmbeddings, tokens: list[str], key: str = "--lora") -> None:
    """Add `tokens` to every text encoder of `pipe` with these embeddings, through diffusers'
    load_textual_inversion (once per encoder, as its advanced DreamBooth script's README does for SDXL)."""
    for slot, vectors in embeddings.vectors.items():
        encoder = getattr(pipe, slot, None)
        tokenizer = getattr(pipe, "tokenizer" if slot == "text_encoder" else "tokenizer_2", None)
        if encoder is None or tokenizer is None or encoder.get_input_embeddings().weight.shape[1] != vectors.shape[1]:
            raise FinetuneError(f"{key}: the embeddings for {embeddings.word!r} do not fit this model's {slot} "
                                f"({tuple(vectors.shape)}); was the LoRA trained on another base model?")
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise FinetuneError(f"{key}: the tokens {', '.join(taken)} are already in the tokenizer (two LoRAs "
                                f"trained for the word {embeddings.word!r}?); load one of them")
        pipe.load_textual_inversion(vectors.to(encoder.dtype), token=list(tokens), text_encoder=encoder,
                                    tokenizer=tokenizer)
