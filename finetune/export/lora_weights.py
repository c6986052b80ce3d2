"""LoRA weights of a pipeline, read from any common file layout, held in peft's key format per component.

One in-memory shape (component -> {module.lora_A.weight: tensor, ...}, plus alpha and the adapter type: LoRA, DoRA,
LoHa or LoKr, whose tensors export/adapters.py names) sits between the file layouts, so converting, continuing
training, generating and fusing all read files the same way. Layouts read:
- diffusers files (`unet.` / `text_encoder.` / `text_encoder_2.` keys): ours, and the diffusers example scripts'
  (peft's lora_A/lora_B, or the older lora.down / lora_linear_layer / attention-processor spellings), DoRA's
  lora_magnitude_vector too; finetune's LoHa/LoKr files hold peft's own keys under the same prefixes;
- kohya files (`lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_`): ours and sd-scripts', with diffusers-style
  U-Net names (SD 1.x/2.x) or the original layout's (input_blocks_4_1_..., as sd-scripts writes SDXL LoRAs), and
  LyCORIS' DoRA (dora_scale), LoHa (hada_*) and LoKr (lokr_*) modules.
Kohya names are converted by diffusers' own reader (`lora_state_dict`), one module at a time, so that a key it
cannot place is named in the error instead of being dropped: a file is read whole or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FinetuneError
from ..family import Family, family_of_lora
from ..lora import adapter_type, load_lora_state, lora_config, lora_state, rank_and_alpha
from .adapters import KOHYA_PARTS as ADAPTER_PARTS
from .adapters import (
    NAMES,
    from_kohya_parts,
    kind_of_parts,
    module_in_features,
    module_rank,
    split_key,
    unscale_full_lokr,
)
from .diffusers_format import WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from .diffusers_format import read_header
from .embeddings import split_bundled

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
ORIGINAL_LAYOUT = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
# The module paths a LoRA layer can sit on: U-Net attention, feed-forward, resnet and embedding layers, and CLIP's
# attention and MLP projections. A converted name outside these is a key that was not understood.
UNET_MODULE = re.compile(
    r"((down_blocks|up_blocks)\.\d+|mid_block)\.("
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))|resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    r"|(down|up)samplers\.0\.conv)"
    r"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]")
TEXT_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


@dataclasses.dataclass
class LoraWeights:
    layers: dict[str, dict[str, torch.Tensor]]  # component -> peft state dict ({module}.lora_A/B.weight)
    alpha: dict[str, float]                      # component -> LoRA alpha (the update is scaled by alpha / rank)
    header: dict[str, str]                       # the file's safetensors metadata
    source_format: str                           # "diffusers" or "kohya"
    family: Family | None = None                 # the base model's family, where known (finetune.family resolves it)
    kind: str = "lora"                           # lora, dora, loha or lokr (lora.type)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # where the tensors cannot show it (below)

    def rank(self, component: str) -> int:
        shown = (module_rank(self.kind, part) for part in module_parts(self.layers[component]).values())
        ranks = {rank for rank in shown if rank is not None}
        if not ranks and component in self.ranks:  # LoKr with every lokr_w2 full shows no rank: the config's
            return self.ranks[component]
        if not ranks:
            raise FinetuneError(f"{component}: no layer shows the LoKr rank (every lokr_w2 is full) and the file does "
                                "not state it; finetune needs it to read the file")
        if len(ranks) != 1:
            raise FinetuneError(f"{component}: {NAMES[self.kind]} layers have different ranks {sorted(ranks)}; "
                                "finetune handles one rank per model part")
        return ranks.pop()

    def modules(self, component: str) -> list[str]:
        return sorted(module_parts(self.layers[component]))

    @property
    def is_sdxl(self) -> bool:
        """For naming text-encoder layers (lora_te1_/lora_te2_): SDXL's family, or a second encoder's layers (a
        LoRA without text-encoder layers names none, so the family does not matter there)."""
        return self.family.is_sdxl if self.family else "text_encoder_2" in self.layers


def module_parts(layers: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {part: tensor}} of one component's peft state dict (export/adapters.py names the parts)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        split = split_key(key)
        if split:
            modules.setdefault(split[0], {})[split[1]] = value
    return modules


def layers_kind(path, layers: dict[str, dict]) -> str:
    """The one adapter type every module of every component makes up (a file mixing them is refused)."""
    kinds = {kind_of_parts(set(parts)) for part in layers.values() for parts in module_parts(part).values()}
    if None in kinds or len(kinds) != 1:
        raise FinetuneError(f"{path}: its modules are of {len(kinds)} adapter types or incomplete; finetune reads "
                            "files of one type (LoRA, DoRA, LoHa or LoKr) with every tensor of each module")
    return str(kinds.pop())


def lora_file(path: str | Path) -> Path:
    """The .safetensors file a path names: the file itself, or a run/export folder's diffusers file."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FinetuneError(f"{path}: no such LoRA file; give a .safetensors file or a folder holding "
                            f"{DIFFUSERS_WEIGHT_NAME}")
    return path


def read_lora(path: str | Path, unet_config=None, family: Family | None = None) -> LoraWeights:
    """Read a LoRA file in any layout above (or a folder holding our diffusers file).

    `unet_config` (the base model's) maps original-layout U-Net blocks; `family` is the base model's, where the
    caller knows it (otherwise the file's own layers and header tell, or it stays None)."""
    path = lora_file(path)
    try:
        tensors, header = load_file(path), read_header(path)
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"{path}: not a readable .safetensors file ({exc})") from None
    tensors, _ = split_bundled(tensors)  # pivotal tuning's bundled embeddings: export.embeddings reads those
    if any(key.startswith(KOHYA_PREFIXES) for key in tensors):
        (layers, alpha), source_format = _from_kohya(tensors, path, unet_config), "kohya"
    elif any(key.split(".", 1)[0] in COMPONENTS for key in tensors):
        (layers, alpha), source_format = _from_diffusers(tensors, header, path), "diffusers"
    else:
        raise FinetuneError(f"{path}: neither a diffusers LoRA (unet./text_encoder. keys) nor a kohya LoRA "
                            f"(lora_unet_/lora_te_ keys); its keys start {', '.join(sorted(tensors)[:3])}")
    kind = layers_kind(path, layers)
    weights = LoraWeights(layers, alpha, header, source_format, kind=kind, ranks=stated_ranks(header, layers))
    for component in layers:
        rank = weights.rank(component)  # one rank per part, checked now rather than at first use
        if kind == "lokr" and source_format == "kohya":
            layers[component] = unscale_full_lokr(layers[component], rank, alpha[component])
    weights.family = family or family_of_lora(width_view(kind, layers), header)
    return weights


def stated_ranks(header: dict, layers: dict) -> dict[str, int]:
    """The ranks a file's header states: diffusers' adapter metadata (`unet.r`), else finetune's own `rank`."""
    adapter = json.loads(header.get("lora_adapter_metadata", "{}"))
    ours = header.get("finetune.rank")
    return {c: int(adapter.get(f"{c}.r", json.loads(ours) if ours else 0)) for c in layers
            if f"{c}.r" in adapter or ours}


def width_view(kind: str, layers: dict[str, dict]) -> dict[str, dict]:
    """Each module's input width as a stand-in lora_A of that width: what family_of_lora reads, for every type."""
    return {component: {f"{module}.lora_A.weight": torch.empty(0, module_in_features(kind, parts))
                        for module, parts in module_parts(part).items()} for component, part in layers.items()}


def _from_kohya(tensors: dict, path: Path, unet_config) -> tuple[dict, dict]:
    unknown = [k for k in tensors if not k.startswith(KOHYA_PREFIXES) or k.partition(".")[2] not in ADAPTER_PARTS]
    if unknown:
        raise not_understood(path, unknown)
    if unet_config is None and any(ORIGINAL_LAYOUT.match(k) for k in tensors):
        raise FinetuneError(f"{path}: its U-Net keys use the original layout (e.g. "
                            f"{next(k for k in sorted(tensors) if ORIGINAL_LAYOUT.match(k))}), which only the base "
                            "model's U-Net config maps; give the base model (export: --base MODEL)")
    if unet_config is not None and not hasattr(unet_config, "layers_per_block"):
        unet_config = FrozenDict(unet_config)  # diffusers reads the config by attribute
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        groups.setdefault(key.partition(".")[0], {})[key] = value
    layers: dict[str, dict] = {}
    alphas: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    for _, group in sorted(groups.items()):
        try:
            converted = _convert_kohya_module(group, unet_config)
        except FinetuneError as exc:  # a module's parts of no type finetune reads: name the file too
            raise FinetuneError(f"{path}: {exc}; nothing was imported") from None
        if converted is None:
            failed += sorted(group)
            continue
        component, module, weights, alpha = converted
        layers.setdefault(component, {}).update(weights)
        if alpha is not None:
            alphas.setdefault(component, {})[module] = alpha
    if failed:
        raise not_understood(path, failed)
    return layers, {component: _one_alpha(path, component, layers[component], alphas.get(component, {}))
                    for component in layers}


def _convert_kohya_module(group: dict, unet_config):
    """(component, module, peft weights, alpha or None) for one kohya module's tensors, through diffusers' reader;
    None when diffusers cannot place it or places it outside the layers a LoRA sits on. DoRA, LoHa and LoKr
    modules (which diffusers' SD readers drop or refuse) are placed by their name alone: diffusers converts a
    stand-in LoRA pair of that name, and the module's own tensors go under the name it finds."""
    name = next(iter(group)).partition(".")[0]
    parts = {k.partition(".")[2]: v for k, v in group.items()}
    if set(parts) - set(KOHYA_PARTS):  # LyCORIS' parts: DoRA's dora_scale, LoHa's hada_*, LoKr's lokr_*
        kind, peft_parts = from_kohya_parts(parts, name)
        probe = {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
                 **({f"{name}.alpha": parts["alpha"]} if "alpha" in parts else {})}
        placed = _convert_kohya_module(probe, unet_config)
        if placed is None:
            return None
        component, module, _, alpha = placed
        return component, module, {f"{module}.{part}": v.float() for part, v in peft_parts.items()}, alpha
    try:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(group), unet_config=unet_config)
    except (ValueError, KeyError, IndexError):
        return None
    if not state:
        return None
    component = next(iter(state)).split(".", 1)[0]
    part = {k.split(".", 1)[1]: v.float() for k, v in state.items()}
    peft = _to_peft(component, part)
    module = _single_module(component, peft)
    if module is None or any(not k.startswith(component + ".") for k in state):
        return None
    return component, module, peft, (next(iter(alphas.values())) if alphas else None)


def _to_peft(component: str, part: dict) -> dict:
    """diffusers' layouts (lora.down, lora_linear_layer, attention processors' to_q_lora) -> peft's lora_A / lora_B.

    Each key is converted by its own spelling: diffusers' converters infer one spelling for a whole dict, and a
    text encoder's attention and MLP layers come out of its kohya reader spelled differently."""
    out = {}
    for key, value in part.items():
        key = key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key
        if ".lora_A." in key or ".lora_B." in key or (split_key(key) and not key.endswith(".weight")):
            out[key] = value  # peft's names already (DoRA's magnitude, LoHa's and LoKr's tensors)
        elif component == "unet" or not ("_lora." in key or "lora_linear_layer" in key):
            out.update(convert_unet_state_dict_to_peft({key: value}))  # also maps .lora.down -> .lora_A
        else:
            spelling = StateDictType.DIFFUSERS_OLD if "_lora." in key else StateDictType.DIFFUSERS
            out.update(convert_state_dict_to_peft({key: value}, spelling))
    return canonical(component, out)


def _single_module(component: str, peft: dict) -> str | None:
    """The one module a converted group holds, if its keys are exactly that module's lora_A/lora_B weights."""
    modules = {k.rsplit(".lora_", 1)[0] for k in peft}
    if len(modules) != 1:
        return None
    module = modules.pop()
    pattern = UNET_MODULE if component == "unet" else TEXT_MODULE
    if not pattern.fullmatch(module) or set(peft) != {f"{module}.lora_A.weight", f"{module}.lora_B.weight"}:
        return None
    return module


def _one_alpha(path: Path, component: str, layers: dict, alphas: dict) -> float:
    found = set(alphas.values())
    if len(found) > 1:
        raise FinetuneError(f"{path}: {component} layers have different alphas {sorted(found)}; finetune handles "
                            "one alpha per model part")
    if found:
        return float(found.pop())
    parts = module_parts(layers)  # no alpha: = rank, as diffusers and the UIs read it
    ranks = [module_rank(kind_of_parts(set(p)) or "lora", p) for p in parts.values()]
    return float(next((r for r in ranks if r is not None), 1))


def _from_diffusers(tensors: dict, header: dict, path: Path) -> tuple[dict, dict]:
    unknown = [k for k in tensors if k.split(".", 1)[0] not in COMPONENTS]
    if unknown:
        raise not_understood(path, unknown)
    adapter = json.loads(header.get("lora_adapter_metadata", "{}"))
    layers, failed = {}, []
    for component in COMPONENTS:
        part = {k[len(component) + 1:]: v.float() for k, v in tensors.items() if k.startswith(component + ".")}
        if not part:
            continue
        peft = _to_peft(component, part)
        pattern = UNET_MODULE if component == "unet" else TEXT_MODULE
        wrong = [k for k in peft if not split_key(k) or not pattern.fullmatch(split_key(k)[0])]  # type: ignore[index]
        if wrong or len(peft) != len(part):
            failed += [f"{component}.{k}" for k in (wrong or part)]
        layers[component] = peft
    if failed:
        raise not_understood(path, failed)
    # Without stored metadata diffusers loads alpha = rank; so do we.
    alpha = {component: float(adapter.get(f"{component}.lora_alpha", _one_alpha(path, component, part, {})))
             for component, part in layers.items()}
    return layers, alpha


def not_understood(path: Path, keys: list[str]) -> FinetuneError:
    return FinetuneError(f"{path}: {len(keys)} key(s) are not LoRA layers finetune understands, e.g. "
                         f"{', '.join(sorted(keys)[:3])}; nothing was imported (finetune reads LoRA, DoRA, LoHa and "
                         "LoKr on attention, feed-forward and resnet layers)")


def weights_from_models(models: dict, family: Family | None = None) -> LoraWeights:
    """The LoRA weights of peft-injected models, e.g. {'unet': unet, 'text_encoder': text_encoder}."""
    kinds = {adapter_type(lora_config(model)) for model in models.values()}
    return LoraWeights({name: canonical(name, lora_state(model)) for name, model in models.items()},
                       {name: rank_and_alpha(lora_config(model))[1] for name, model in models.items()},
                       {}, "diffusers", family, kinds.pop(),
                       {name: rank_and_alpha(lora_config(model))[0] for name, model in models.items()})


def load_into_models(weights: LoraWeights, models: dict, path: str | Path) -> None:
    """Start from a file's LoRA: the models' injected LoRA (from lora.*) must match the file's exactly."""
    if set(weights.layers) != set(models):
        has, wants = sorted(weights.layers), sorted(models)
        raise FinetuneError(f"lora.init_from: {path} has LoRA on {', '.join(has)} but this run trains "
                            f"{', '.join(wants)}; set lora.text_encoder to match the file")
    for name, model in models.items():
        config = lora_config(model)
        rank, alpha = rank_and_alpha(config)
        if weights.kind != adapter_type(config):
            raise FinetuneError(f"lora.init_from: {path} is a {NAMES[weights.kind]} file; set "
                                f"lora.type={weights.kind}")
        if weights.rank(name) != rank:
            raise FinetuneError(f"lora.init_from: {path} has rank {weights.rank(name)} on {name}; set "
                                f"lora.rank={weights.rank(name)}")
        if abs(weights.alpha[name] - alpha) > 1e-6:
            raise FinetuneError(f"lora.init_from: {path} has alpha {weights.alpha[name]:g} on {name}; set "
                                f"lora.alpha={weights.alpha[name]:g}")
        state = lora_state(model)
        ours = canonical(name, state)
        modules = sorted(module_parts(ours))
        if modules != weights.modules(name):
            theirs = set(weights.modules(name))
            extra = sorted(theirs - set(modules)) or sorted(set(modules) - theirs)
            raise FinetuneError(f"lora.init_from: {path} puts LoRA on other {name} layers than lora.unet_targets "
                                f"does (differs at {extra[0]}); choose the preset the file was trained with")
        wrong = [k for k, v in weights.layers[name].items() if k not in ours or v.shape != ours[k].shape]
        if wrong:
            raise FinetuneError(f"lora.init_from: {path} does not fit this model's {name} ({wrong[0]} is "
                                f"{tuple(weights.layers[name][wrong[0]].shape)}, the model's "
                                f"{tuple(ours[wrong[0]].shape) if wrong[0] in ours else 'none'}): was it trained on "
                                "another base model (or, LoKr, with another lora.rank)?")
        bare = not any(k.startswith("text_model.") for k in state)
        load_lora_state(model, {k.removeprefix("text_model.") if bare else k: v
                                for k, v in weights.layers[name].items()})


def fit_to_models(weights: LoraWeights, models: dict) -> tuple[LoraWeights, list[str]]:
    """The part of `weights` whose layers exist in `models` (component -> module) with the same shapes, and the
    names of the layers that do not (a LoRA trained on a base model, loaded into its inpainting variant)."""
    layers: dict[str, dict] = {}
    unfit: list[str] = []
    for component, part in weights.layers.items():
        model = models.get(component)
        found = dict(model.named_modules()) if model is not None else {}
        for module, parts in module_parts(part).items():
            target = found.get(module, found.get(module.removeprefix("text_model.")))
            down, up = parts["lora_A.weight"], parts["lora_B.weight"]  # LoRA and DoRA: what diffusers loads
            weight = getattr(target, "weight", None)
            if weight is None or weight.shape[1] != down.shape[1] or weight.shape[0] != up.shape[0]:
                unfit.append(f"{component}.{module}")
                continue
            layers.setdefault(component, {}).update({f"{module}.{name}": value for name, value in parts.items()})
    fitting = LoraWeights(layers, {c: weights.alpha[c] for c in layers}, weights.header, weights.source_format,
                          weights.family, weights.kind, weights.ranks)
    return fitting, unfit


def canonical(component: str, layers: dict) -> dict:
    """Text-encoder module paths always start with text_model. (transformers 5's CLIPTextModel drops that
    wrapper, CLIPTextModelWithProjection and the UIs' CLIP keep it), so files compare and convert alike."""
    if component == "unet":
        return layers
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in layers.items()}
