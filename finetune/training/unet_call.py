"""The training forward of the U-Net, eager or replayed from CUDA graphs.

At batch 1 + 1 a U-Net step launches thousands of small kernels, and on a fast GPU the host cannot launch them as
fast as the GPU runs them (an SD1.5 step measured about 38 ms of GPU work inside 170 ms, BENCHMARKS.md). A CUDA
graph records the forward and the backward once and replays each as a single launch.
torch.cuda.make_graphed_callables does the recording; this module decides when it can, and keeps the eager path
as the fallback.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger("finetune")


class UNetOnTensors(torch.nn.Module):
    """The U-Net as a function of tensors only, returning the prediction tensor (what graph capture needs).

    SDXL's extra conditioning (pooled text embeddings, size/crop ids) comes as two more positional tensors.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timesteps, embeddings, *added):
        return self.unet(sample, timesteps, embeddings, return_dict=False, **added_conditioning(added))[0]


def added_conditioning(added: tuple) -> dict:
    """SDXL's pooled text embeddings and size/crop ids as the U-Net takes them (nothing for SD 1.x/2.x)."""
    return {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}


def graphs_usable(requested: bool, device: torch.device, num_processes: int, lora_dropout: float,
                  gradient_accumulation: int, batch_shapes: int = 1) -> bool:
    """Whether CUDA graphs can replace the eager U-Net call; says why not once, if they were asked for."""
    if not requested:
        return False
    why_not = ("there is no CUDA GPU" if device.type != "cuda" else
               "they are single-process (DDP's gradient hooks cannot be recorded)" if num_processes > 1 else
               "LoRA dropout draws new random masks every step" if lora_dropout > 0 else
               # the replayed backward writes its gradients into fixed buffers, which .grad then holds: a second
               # micro-step would overwrite the first one's instead of adding to them
               "gradient accumulation would overwrite, not sum, the recorded gradients"
               if gradient_accumulation > 1 else
               # each recorded shape keeps its own activation memory; one pool shared between shapes is not proven
               # safe here, and several pools would multiply the activations (SDXL: over 2 GB each)
               f"batches come in {batch_shapes} shapes (data.buckets), and each recording keeps its own memory"
               if batch_shapes > 1 else None)
    if why_not:
        log.warning("notice: train.cuda_graphs is off for this run: %s", why_not)
        return False
    return True


def training_unet_call(unet, dtype: torch.dtype, cfg, accelerator, plans) -> UNetForward:
    """The recipe's U-Net call: CUDA graphs where train.cuda_graphs asks for them and this run allows them."""
    train = cfg.train
    shapes = {(plan.size, len(plan.instance), len(plan.classes)) for plan in plans}
    return UNetForward(unet, dtype, graphs_usable(train.cuda_graphs, accelerator.device, accelerator.num_processes,
                                                  cfg.lora.dropout, train.gradient_accumulation, len(shapes)))


class UNetForward:
    """Call as forward(noisy, timesteps, embeddings, *added) -> prediction.

    Inputs are cast to the U-Net's compute dtype (without autocast a bf16 U-Net needs bf16 inputs). With graphs,
    the first call is recorded (graphs_usable has checked that every batch has one shape) and later calls of that
    shape replay it; if recording fails the run goes on eagerly, with a notice.
    """

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype, use_graphs: bool):
        self.dtype, self.use_graphs = dtype, use_graphs
        self.unet = unet
        self.graphed: Callable | None = None
        self.recorded_for: tuple | None = None  # (shape, dtype, requires_grad) of each input the graph was made for
        self.recording_seconds = 0.0  # warm-up and recording, inside the first step: reported apart from the steps

    def __call__(self, noisy, timesteps, embeddings, *added) -> torch.Tensor:
        inputs = (noisy.to(self.dtype), timesteps, embeddings.to(self.dtype), *(a.to(self.dtype) for a in added))
        if not self.use_graphs:  # the U-Net itself: the loop is three calls from it (objective, this, U-Net)
            return self.unet(*inputs[:3], return_dict=False, **added_conditioning(inputs[3:]))[0]
        key = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in inputs)
        if self.graphed is None:
            started = time.perf_counter()
            self.graphed, self.recorded_for = self._record(inputs), key
            self.recording_seconds = time.perf_counter() - started
            self.use_graphs = self.graphed is not None
        if self.graphed is not None and self.use_graphs and key == self.recorded_for:
            return self.graphed(*inputs)
        return self.unet(*inputs[:3], return_dict=False, **added_conditioning(inputs[3:]))[0]

    def _record(self, inputs) -> Callable | None:
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        try:  # its own wrapper: make_graphed_callables replaces the forward of the module it is given
            graphed = torch.cuda.make_graphed_callables(UNetOnTensors(self.unet), samples, num_warmup_iters=3)
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager path, which is correct
            log.warning("notice: recording the U-Net as a CUDA graph failed (%s); training eagerly",
                        str(error).splitlines()[0][:200])
            torch.cuda.synchronize()
            return None
        torch.cuda.empty_cache()  # the eager warm-up's activations: the graphs replay from a pool of their own
        log.info("recorded the U-Net's forward and backward as CUDA graphs for input %s", tuple(inputs[0].shape))
        return graphed
