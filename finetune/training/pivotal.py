"""Pivotal tuning: the trigger word becomes new tokens whose input embeddings train beside the LoRA.

With lora.pivotal, `lora.pivotal_tokens` tokens (<s0><s1>...) are added to every tokenizer of the pipeline and
every text encoder's embedding matrix grows by as many rows, started from the class word's embedding or at
random; the instance prompts say <s0><s1> where they said the word. Only those rows train, with their own
learning rate (an optimizer group of their own) until lora.pivotal_stop_step.

Why a separate parameter instead of a trainable embedding matrix with a masked gradient: the new rows live in a
small fp32 tensor per encoder of their own, and a forward hook on the encoder's embedding layer puts them where a
new token's id stands. The matrix itself never requires a gradient, so no optimizer (weight decay, 8-bit state,
fused kernels) can move one of its other rows: they stay bit-identical by construction, and the optimizer state
is (tokens x width), not the whole vocabulary's. The matrix's new rows get the trained values at each export.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import ValidationConfig
from ..data.dataset import Example
from ..errors import FinetuneError
from ..export.embeddings import EMBEDDINGS_NAME, TokenEmbeddings, read_embeddings, rewrite_prompt, token_names

log = logging.getLogger("finetune")


def pivotal_word(cfg) -> str:
    """The prompt word the new tokens replace: lora.pivotal_word, else data.trigger's first word."""
    return cfg.pivotal_word()


def class_word(cfg) -> str:
    return (cfg.lora.pivotal_class_word or cfg.data.class_prompt.split()[-1]).strip()


def stop_step(cfg) -> int:
    """The optimizer step after which the embeddings stay fixed (diffusers' advanced DreamBooth script stops its
    textual inversion halfway by default: train_text_encoder_ti_frac=0.5)."""
    stop = cfg.lora.pivotal_stop_step
    return cfg.train.max_steps // 2 if stop is None else stop


class PivotalTuning:
    """The new tokens of one run: their trainable rows per text encoder and the hooks that use them."""

    def __init__(self, cfg, pipe, slots: tuple[str, ...], tokenizer_names: tuple[str, ...]):
        self.word, self.tokens, self.stop = pivotal_word(cfg), token_names(cfg.lora.pivotal_tokens), stop_step(cfg)
        self.encoders = {slot: getattr(pipe, slot) for slot in slots}
        self.first: dict[str, int] = {}
        self.rows: dict[str, torch.nn.Parameter] = {}
        # Started without touching the global RNG: a run's LoRA init and noise stay what they are without pivotal.
        with torch.random.fork_rng(devices=[]):
            generator = torch.Generator().manual_seed(cfg.train.seed)
            added: dict[int, int] = {}  # one tokenizer object may serve two encoders: its tokens are added once
            for slot, name in zip(slots, tokenizer_names):
                tokenizer = getattr(pipe, name)
                if id(tokenizer) not in added:
                    added[id(tokenizer)] = self.add_tokens(tokenizer, name)
                start = added[id(tokenizer)]
                self.encoders[slot].resize_token_embeddings(len(tokenizer), mean_resizing=False)
                init = self.initial_rows(cfg, tokenizer, self.encoders[slot], generator)
                self.first[slot], self.rows[slot] = start, torch.nn.Parameter(init)
        for slot, encoder in self.encoders.items():
            encoder.get_input_embeddings().register_forward_hook(self.hook(slot))
        self.commit()

    def add_tokens(self, tokenizer, name: str) -> int:
        """The id of the first new token, after adding them all to the tokenizer."""
        taken = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if taken:
            raise FinetuneError(f"lora.pivotal: the model's {name} already has the token {taken[0]}; use a base "
                                "model without textual-inversion tokens")
        start = len(tokenizer)
        tokenizer.add_tokens(self.tokens)
        if tokenizer.convert_tokens_to_ids(self.tokens) != list(range(start, start + len(self.tokens))):
            raise FinetuneError(f"lora.pivotal: {name} did not give the new tokens consecutive ids")
        return start

    def initial_rows(self, cfg, tokenizer, encoder, generator: torch.Generator) -> torch.Tensor:
        """class: every new row is the mean embedding of the class word's tokens (the textual inversion paper's
        initializer word); random: normal with the vocabulary's per-dimension spread (as diffusers' advanced
        script starts them)."""
        weight = encoder.get_input_embeddings().weight.detach().float()[:len(tokenizer) - len(self.tokens)]
        count = len(self.tokens)
        if cfg.lora.pivotal_init == "random":
            return torch.randn(count, weight.shape[1], generator=generator) * weight.std(dim=0).cpu()
        word = class_word(cfg)
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise FinetuneError(f"lora.pivotal_class_word: {word!r} gives no tokens; name the class, e.g. dog")
        return weight[ids].mean(dim=0).cpu().repeat(count, 1)

    def hook(self, slot: str):
        first, rows = self.first[slot], self.rows[slot]

        def put_rows(module, args, output):
            ids = args[0]
            new = ids >= first
            picked = rows.to(output.device, output.dtype)[(ids - first).clamp(0, len(self.tokens) - 1)]
            return torch.where(new.unsqueeze(-1), picked, output)
        return put_rows

    def rewrite(self, prompt: str) -> str:
        return rewrite_prompt(prompt, self.word, "".join(self.tokens))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.rows.values())

    def to(self, device) -> None:
        """The rows on the training device (the optimizer holds these very tensors: moved in place)."""
        for row in self.rows.values():
            row.data = row.data.to(device)

    def reduce_gradients(self, accelerator) -> None:
        """With several processes: the rows are no module Accelerate wraps, so their gradient is averaged here,
        as DDP averages the LoRA's, before clipping sees it."""
        if accelerator.num_processes > 1:
            for row in self.rows.values():
                row.register_hook(lambda grad: accelerator.reduce(grad, "mean"))

    def step_done(self, step: int) -> None:
        """After optimizer step `step`: from lora.pivotal_stop_step on the rows take no gradient, so no optimizer
        moves them again."""
        if step >= self.stop:
            for row in self.rows.values():
                row.requires_grad_(False)

    def commit(self) -> None:
        """Write the rows into each encoder's embedding matrix (so the model itself holds the trained tokens)."""
        with torch.no_grad():
            for slot, encoder in self.encoders.items():
                weight = encoder.get_input_embeddings().weight
                weight[self.first[slot]:self.first[slot] + len(self.tokens)] = self.rows[slot].to(weight.dtype)

    def embeddings(self) -> TokenEmbeddings:
        self.commit()
        return TokenEmbeddings(self.word, list(self.tokens), {s: r.detach().float().cpu() for s, r in
                                                               self.rows.items()})

    def restore(self, checkpoint: Path) -> None:
        """The rows a checkpoint saved (its embeddings file holds them in fp32: bit for bit)."""
        path = Path(checkpoint) / EMBEDDINGS_NAME
        if not path.is_file():
            raise FinetuneError(f"train.resume: {checkpoint} has no {EMBEDDINGS_NAME}; it was trained without "
                                "lora.pivotal: resume with its settings, or start afresh")
        saved = read_embeddings(path)
        if saved.tokens != self.tokens or set(saved.vectors) != set(self.rows):
            raise FinetuneError(f"train.resume: {checkpoint} has the tokens {''.join(saved.tokens)}, this run "
                                f"{''.join(self.tokens)}; resume with the checkpoint's lora.pivotal_tokens")
        with torch.no_grad():
            for slot, row in self.rows.items():
                row.copy_(saved.vectors[slot].to(row.device))
        self.commit()


def add_pivotal_tokens(cfg, pipe, kind, instance: list[Example]) -> tuple[PivotalTuning | None, list[Example]]:
    """With lora.pivotal: the new tokens in the pipeline, and the instance examples with their prompts saying
    them where they said the word (class prompts keep theirs); without it: (None, the examples as they are)."""
    if not cfg.lora.pivotal:
        return None, instance
    pivotal = PivotalTuning(cfg, pipe, kind.text_encoder_names, kind.tokenizer_names)
    log.info("pivotal tuning: %r is now %s in the instance prompts (%s init, learning rate %g, until step %d)",
             pivotal.word, "".join(pivotal.tokens), cfg.lora.pivotal_init, cfg.lora.pivotal_learning_rate,
             pivotal.stop)
    return pivotal, [dataclasses.replace(e, prompt=pivotal.rewrite(e.prompt)) for e in instance]


def with_tokens(validation: ValidationConfig, pivotal: PivotalTuning | None) -> ValidationConfig:
    """The validation prompts as training sees them: the word becomes the new tokens."""
    if pivotal is None:
        return validation
    return dataclasses.replace(validation, prompts=[pivotal.rewrite(p) for p in validation.prompts])
