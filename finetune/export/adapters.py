"""The four adapter types' tensors per module, in peft's names and in the kohya/LyCORIS names the UIs read.

Per module, peft's state dict holds (shapes for a Linear of `out` x `in`, rank r):
- lora:  lora_A.weight (r, in), lora_B.weight (out, r); the update is B @ A x alpha / r.
- dora:  the same plus lora_magnitude_vector (out,): W' = m / ||W + dW||_row x (W + dW), one norm per output row.
- loha:  hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in); the update is
         (w1_a @ w1_b) * (w2_a @ w2_b) x alpha / r.
- lokr:  lokr_w1 (out1, in1) and either lokr_w2_a (out2, r) + lokr_w2_b (r, in2) or a full lokr_w2 (out2, in2), as
         peft chooses by r; the update is kron(w1, w2) x alpha / r.

The kohya/LyCORIS file, as the clients read it (ComfyUI comfy/weight_adapter/{lora,loha,lokr,base}.py, A1111
extensions-builtin/Lora/network_{lora,hada,lokr}.py and network.py, LyCORIS lycoris/modules/locon.py), keeps one
`<kohya module name>.<part>` key per tensor and an `.alpha` per module:
- lora: lora_down.weight = A, lora_up.weight = B; scale alpha / lora_down's rows.
- dora: plus dora_scale = m as (out, 1): LyCORIS' layout for DoRA on the output axis (its default, wd_on_out), which
  ComfyUI tells from the input-axis layout (1, in) by dora_scale.shape[0] == the weight's rows.
- loha: the four hada_ tensors under peft's names; scale alpha / hada_w1_b's rows (both clients).
- lokr: lokr_w1, lokr_w2_a/lokr_w2_b under peft's names; scale alpha / lokr_w2_b's rows. A full lokr_w2 gets scale
  1 in both clients (alpha is ignored, "dim" unset), so we store it with peft's alpha / r multiplied in.
"""
from __future__ import annotations

import re

import torch

from ..errors import FinetuneError

PEFT_PARTS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
PEFT_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hada_w[12]_[ab]|"
                      r"lokr_w1|lokr_w2(?:_[ab])?)$")
KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a",
               "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def split_key(key: str) -> tuple[str, str] | None:
    """'m.hada_w1_a' -> ('m', 'hada_w1_a'); None for a key that is no adapter tensor."""
    match = PEFT_KEY.match(key)
    return (match.group(1), match.group(2)) if match else None


def kind_of_parts(parts: set[str]) -> str | None:
    """The adapter type one module's peft parts make up, or None if they make up none."""
    if parts == {"lora_A.weight", "lora_B.weight"}:
        return "lora"
    if parts == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}:
        return "dora"
    if parts == set(PEFT_PARTS["loha"]):
        return "loha"
    if parts in ({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}):
        return "lokr"
    return None


def module_rank(kind: str, parts: dict[str, torch.Tensor]) -> int | None:
    """The rank a module's tensors show (None for LoKr with a full lokr_w2, which has none)."""
    if kind in ("lora", "dora"):
        return parts["lora_A.weight"].shape[0]
    if kind == "loha":
        return parts["hada_w1_b"].shape[0]
    return parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None


def module_in_features(kind: str, parts: dict[str, torch.Tensor]) -> int:
    """The input width of the layer a module adapts (what tells a model family apart)."""
    if kind in ("lora", "dora"):
        return parts["lora_A.weight"].shape[1]
    if kind == "loha":
        return parts["hada_w1_b"].shape[1]
    w2 = parts.get("lokr_w2", parts.get("lokr_w2_b"))
    assert w2 is not None
    return parts["lokr_w1"].shape[1] * w2.shape[1]


def to_kohya_parts(kind: str, parts: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """One module's tensors by their kohya/LyCORIS part names (alpha not included)."""
    if kind in ("lora", "dora"):
        out = {"lora_down.weight": parts["lora_A.weight"], "lora_up.weight": parts["lora_B.weight"]}
        if kind == "dora":
            out["dora_scale"] = parts["lora_magnitude_vector"].reshape(-1, 1)
        return out
    if kind == "lokr" and "lokr_w2" in parts:
        return {"lokr_w1": parts["lokr_w1"], "lokr_w2": parts["lokr_w2"] * (alpha / rank)}
    return dict(parts)


def from_kohya_parts(parts: dict[str, torch.Tensor], name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(type, peft parts) of one kohya module's tensors (alpha left out); a full lokr_w2 still carries the scale
    the file multiplied in (see unscale_full_lokr)."""
    names = set(parts) - {"alpha"}
    if names == {"lora_down.weight", "lora_up.weight"} or names == {"lora_down.weight", "lora_up.weight",
                                                                  "dora_scale"}:
        peft = {"lora_A.weight": parts["lora_down.weight"], "lora_B.weight": parts["lora_up.weight"]}
        if "dora_scale" not in names:
            return "lora", peft
        scale = parts["dora_scale"]
        if scale.ndim != 2 or scale.shape[1] != 1 or scale.shape[0] != peft["lora_B.weight"].shape[0]:
            raise FinetuneError(f"{name}.dora_scale has shape {tuple(scale.shape)}: finetune reads DoRA on the "
                                f"output axis, ({peft['lora_B.weight'].shape[0]}, 1) here (the input-axis layout "
                                "of older LyCORIS files normalises other norms than peft's DoRA)")
        return "dora", {**peft, "lora_magnitude_vector": scale.reshape(-1)}
    kind = kind_of_parts(names)
    if kind not in ("loha", "lokr"):
        raise FinetuneError(f"{name}: parts {', '.join(sorted(names))} are no LoRA, DoRA, LoHa or LoKr module "
                            "finetune reads (Tucker hada_t*/lokr_t2 and a factored lokr_w1 are not read)")
    return kind, {part: parts[part] for part in names}


def unscale_full_lokr(layers: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """peft's values of full lokr_w2 tensors read from a kohya file (which multiplies in alpha / rank)."""
    return {k: v * (rank / alpha) if k.endswith(".lokr_w2") else v for k, v in layers.items()}


def diffusers_note(kind: str, path, kohya: bool) -> str | None:
    """The one line for the end of a run whose diffusers-named file diffusers cannot load (LoHa, LoKr); `kohya`:
    whether the run writes the kohya file too."""
    if kind not in ("loha", "lokr"):
        return None
    where = ("the kohya file is for ComfyUI, A1111 and Forge" if kohya else
             "for ComfyUI, A1111 and Forge set export.kohya=true or run finetune export RUN --format kohya")
    return (f"{path} holds finetune's {NAMES[kind]} (peft's keys) for lora.init_from and finetune export; diffusers' "
            f"load_lora_weights does not read {NAMES[kind]}: {where}")


def kohya_note(kind: str, path) -> str | None:
    """The one line for a kohya file that not every UI reads as trained: DoRA's output-axis magnitude, which A1111
    does not read (it assumes the input axis) and ComfyUI/Forge scale by the base weight's norm, not the merged one."""
    if kind != "dora":
        return None
    return (f"{path}: DoRA with LyCORIS' output-axis dora_scale; A1111 reads only input-axis DoRA (it loads this "
            "wrong) and ComfyUI/Forge normalise it by the base weight's norm (close to, not equal to, the trained "
            "model); the diffusers file loads exactly")
