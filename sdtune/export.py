"""Export a trained LoRA for other tools: diffusers, PEFT, or the one kohya file that AUTOMATIC1111, ComfyUI,
InvokeAI and Forge load.

    sdtune export RUN --format kohya -o my_subject.safetensors

RUN is a run folder or one of its ``checkpoints/step-NNNNNN/`` folders. Both hold
``pytorch_lora_weights.safetensors`` (diffusers format, each adapter's PEFT config in its metadata); every
format is converted from that file by its writer in ``WRITERS`` (``--format`` offers its keys; training writes
the formats that name a run file; ``sdtune push`` uploads those files). A new format is one function and one
entry there. The kohya key rules were read from the loaders' own code; each rule below says where it comes
from, and ``tests/test_export.py`` re-implements the loaders' rules to check every key. Key prefixes and
version metadata come from the model's family (``Family.kohya_prefixes``, ``Family.kohya_version``), and so do
the names of a denoiser whose kohya files use its original layout (``Family.kohya_modules``: FLUX.1's BFL names
and SD3's MMDiT names, with the LoRAs of q, k and v fused into one on qkv; ``tests/test_flux.py`` reads them back
through diffusers' converter, ``tests/test_sd3.py`` through ComfyUI's key mapping).

Every file keeps to the canonical key layout (``sdtune.layout``: text-encoder keys under ``text_model.``),
which every diffusers / transformers version reads, and names the base model publicly (``public_name``: a hub
id, or a local model's folder or file name, never a path). The kohya file's metadata also describes the
training data as kohya's own files do (caption tag frequencies, data folders, buckets, start time, the file
hashes), from the ``DATA_SUMMARY`` training writes into the run folder.

torch and safetensors are imported inside the functions that use them: the command line reads ``WRITERS`` for
``--format``'s choices without paying for torch.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import __version__, families
from sdtune.embedding_files import BUNDLE_PREFIX, Files, bundle_tensors, folder_files, read_file
from sdtune.errors import KohyaUnavailable, SdtuneError
from sdtune.families import Family
from sdtune.families.base import KohyaModule
from sdtune.files import atomic_path
from sdtune.hub import public_model_id
from sdtune.layout import CLIP_TEXT_CLASSES, canonical_text_encoder_keys, sort_metadata
from sdtune.ldm import original_unet_names
from sdtune.models import inspect_model
from sdtune.runs import (
    CHECKPOINTS,
    EMBEDDINGS_DIR,
    KOHYA_SUFFIX,
    MARK_KEY,
    STATE,
    WEIGHT_NAME,
    check_output_file,
    check_output_folder,
    is_run_folder,
    missing_lora,
    open_safetensors,
    run_config,
    written_by_sdtune,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PeftModel.save_pretrained's names

# Beside a finished run's LoRA: what the kohya metadata says about the training data (tag frequencies from the
# captions, image counts, buckets, start time), recorded at training time because export runs later.
DATA_SUMMARY = "data_summary.json"


def public_name(name_or_path: str | None) -> str | None:
    """What sdtune may publish about a model or data source: a hub id as it is, a local folder or file as
    its base name (``../models/sd15`` -> ``sd15``, as kohya's ``ss_sd_model_name``), never a path."""
    if not name_or_path:
        return None
    public = public_model_id(name_or_path)
    if public:
        return public
    # both separators, whatever this system uses: a Windows path in a recipe must not leak on Linux either
    return re.split(r"[\\/]", name_or_path.rstrip("\\/"))[-1] or None



# The tensors of each LyCORIS adapter kind, by the names PEFT gives them (``<module>.hada_w1_a``), which are
# LyCORIS' own: what its files hold after ``<kohya module name>.`` and what ComfyUI (comfy/weight_adapter/
# loha.py, lokr.py) and AUTOMATIC1111 (extensions-builtin/Lora/network_hada.py, network_lokr.py) read.
LYCORIS_FACTORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


def lycoris_kind(keys: list[str] | set[str]) -> str | None:
    """``loha`` or ``lokr`` when tensor names are LyCORIS' (PEFT's ``unet.x.hada_w1_a`` or kohya's
    ``lora_unet_x.hada_w1_a``), None for a LoRA's."""
    parts = {k.rsplit(".", 1)[-1] for k in keys}
    return next((kind for kind, names in LYCORIS_FACTORS.items() if parts & set(names)), None)


def sorted_config(config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT config dict (``to_dict()``) with its sets as sorted lists. PEFT keeps ``target_modules`` as a
    set, whose order follows Python's per-process string hashing: written as it is, two runs with bitwise the
    same weights wrote files with different bytes (and sha256), and ``sample --replay`` refused the rerun."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


@dataclass
class Adapter:
    """One component's adapter: tensors in PEFT naming and the PEFT config fields that scale them.

    LoRA tensors: ``<module>.lora_A.weight`` (rank, in[, kh, kw]), ``<module>.lora_B.weight`` (out, rank[, 1,
    1]), and with DoRA ``<module>.lora_magnitude_vector`` ((out,) for Linear, (1, out, 1, 1) for Conv2d).
    LoHa / LoKr tensors: ``<module>.<factor>`` for the factors of ``LYCORIS_FACTORS`` PEFT made.
    config: ``LoraConfig`` / ``LoHaConfig`` / ``LoKrConfig.to_dict()``; ``peft_type``, ``r``, ``lora_alpha``
    (LoRA) or ``alpha`` (LoHa, LoKr), ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and ``use_dora``
    are read.
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_module(cls, module: torch.nn.Module, adapter_name: str = "default") -> Adapter:
        """The adapter a PEFT-injected module holds (as ``sdtune.lora.add_lora`` made it)."""
        import torch
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        return cls(
            canonical_text_encoder_keys(tensors, type(module).__name__),  # as in the run's files
            sorted_config(module.peft_config[adapter_name].to_dict()),  # type: ignore[index]
        )

    @property
    def kind(self) -> str:
        """``lora``, ``loha`` or ``lokr``: the config's ``peft_type``, else what the tensor names say."""
        # "LOHA" from a file, PeftType.LOHA from a live config
        peft_type = str(self.config.get("peft_type") or "").rsplit(".", 1)[-1].lower()
        if peft_type in ("lora", *LYCORIS_FACTORS):
            return peft_type
        return lycoris_kind(set(self.tensors)) or "lora"

    def modules(self) -> list[str]:
        if self.kind == "lora":
            return sorted(k[: -len(".lora_A.weight")] for k in self.tensors if k.endswith(".lora_A.weight"))
        names = LYCORIS_FACTORS[self.kind]
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors if k.rsplit(".", 1)[-1] in names})

    def rank(self) -> int:
        """The configured rank (``r``), else the first module's."""
        if self.config.get("r"):
            return int(self.config["r"])
        first = self.modules()[0]
        if self.kind == "lora":
            return int(self.tensors[first + ".lora_A.weight"].shape[0])
        factors = {k.rsplit(".", 1)[-1]: v for k, v in self.tensors.items() if k.startswith(first + ".")}
        return _lycoris_rank(factors) or 1

    def scale(self, module: str) -> float:
        """The factor PEFT multiplies a module's update by (``B @ A`` for LoRA, the Hadamard or Kronecker
        product for LoHa / LoKr): alpha / r (peft LoraLayer.update_layer, LycorisLayer's LoHa/LoKr
        update_layer), alpha / sqrt(r) with rsLoRA."""
        c = self.config
        r = self.rank()
        alpha = c.get("lora_alpha", c.get("alpha", r))  # LoraConfig's lora_alpha, LoHa/LoKrConfig's alpha
        r = (c.get("rank_pattern") or {}).get(_pattern_key(c.get("rank_pattern") or {}, module), r)
        alpha = (c.get("alpha_pattern") or {}).get(_pattern_key(c.get("alpha_pattern") or {}, module), alpha)
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r


def _lycoris_rank(factors: dict[str, torch.Tensor]) -> int:
    """The rank of one module's LoHa / LoKr factors (``{factor name: tensor}``): the rows of its ``*_b``
    factor (LyCORIS' ``lora_dim``), 0 for a LoKr of two full matrices, which has none."""
    for name in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in factors:
            return int(factors[name].shape[0])
    return 0


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    # peft.utils.other.get_pattern_key: a pattern matches a module name at a dot boundary
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


# --------------------------------------------------------------------------------------------------------
# kohya format


def kohya_module_name(family: Family, component: str, module: str) -> str:
    """The kohya name of one LoRA'd module: its prefix plus the diffusers/transformers module path, with dots
    turned into underscores (kohya networks/lora.py: ``lora_name.replace(".", "_")``).

    UNet names stay the diffusers ones (down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q): what
    sd-scripts writes for SD1/SD2, and what the loaders take for SD1, SD2 and SDXL. ComfyUI maps them via
    comfy/utils.py unet_to_diffusers, AUTOMATIC1111 via convert_diffusers_name_to_compvis (bar two SDXL
    module kinds, see kohya_warnings), InvokeAI and diffusers natively.

    Text-encoder names carry the ``text_model`` level of transformers' CLIPTextModel
    (lora_te_text_model_encoder_layers_0_self_attn_q_proj): ComfyUI's LORA_CLIP_MAP keys and A1111's regexes
    require it, although transformers >= 5 names CLIPTextModel's modules without it (PEFT keys
    ``encoder.layers.0...``) while CLIPTextModelWithProjection keeps it.
    """
    prefixes = family.kohya_prefixes
    if component not in prefixes:
        raise SdtuneError(f"a {family.label} LoRA has no {component}; kohya files hold {', '.join(prefixes)}")
    if component != family.denoiser_name:
        module = module.removeprefix("text_model.")
        # CLIPTextModelWithProjection.text_projection sits beside text_model, not in it
        if not module.startswith("text_projection"):
            module = "text_model." + module
    return prefixes[component] + module.replace(".", "_")


# A LoHa / LoKr on a family whose kohya LoRA files use the original model's fused modules (FLUX.1, SD3): its
# factors cannot be fused (a Hadamard or Kronecker product of q, k, v is not one of qkv), so each diffusers
# module keeps its own name under SimpleTuner's LyCORIS prefix, which ComfyUI and Forge map onto the original
# weights' slices (comfy/lora.py model_lora_keys_unet, Flux and SD3: "lycoris_" + the diffusers module path)
LYCORIS_PREFIX = "lycoris_"


def lycoris_module_name(family: Family, component: str, module: str) -> str:
    """The name of one module of a LoHa / LoKr file: ``lycoris_<module path>`` for a flow-matching family's
    transformer (``LYCORIS_PREFIX``), else its kohya name (``kohya_module_name``)."""
    if component == family.denoiser_name and family.kohya_modules:
        return LYCORIS_PREFIX + module.replace(".", "_")
    return kohya_module_name(family, component, module)


def to_kohya(
    family: Family,
    adapters: dict[str, Adapter],
    *,
    title: str = "LoRA",
    trigger_word: str | None = None,
    base_model: str | None = None,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    output_name: str | None = None,
    clip_skip: int | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, str] | None = None,
    architecture: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT adapters ({component: Adapter}) -> (kohya tensors, safetensors metadata). Pure: no files, no
    model weights. The metadata ends with kohya's ``sshs_*`` hashes of these tensors (``kohya_hashes``).

    Per module ``NAME.lora_down.weight`` = PEFT lora_A, ``NAME.lora_up.weight`` = lora_B, ``NAME.alpha`` and,
    with DoRA, ``NAME.dora_scale``; a family with an original layout (``Family.kohya_modules``: FLUX.1, SD3) gets
    its denoiser's modules under those names, fused where the original model fuses them
    (``_original_layout_tensors``). A LoHa or LoKr is written in LyCORIS' layout instead (``NAME.hada_w1_a``
    ... or ``NAME.lokr_w1`` ..., ``NAME.alpha``; ``_lycoris_tensors``).
    """
    if not adapters:
        raise SdtuneError("no LoRA to export: the run trained no adapter")
    tensors: dict[str, torch.Tensor] = {}
    for component, adapter in adapters.items():
        tensors.update(_kohya_tensors(family, component, adapter, tensors))
    # the denoiser's adapter (else the first) gives kohya's ss_network_dim / ss_network_alpha
    first = adapters.get(family.denoiser_name) or next(iter(adapters.values()))
    rank = first.rank()
    dora = any(k.endswith(".lora_magnitude_vector") for a in adapters.values() for k in a.tensors)
    metadata = kohya_metadata(
        family, rank, first.scale("") * rank, title=title, trigger_word=trigger_word, base_model=base_model,
        prediction_type=prediction_type, resolution=resolution, dora=dora, output_name=output_name,
        clip_skip=clip_skip, data=data, network_args=_network_args(first), training=training,
        architecture=architecture,
    )
    return tensors, {**metadata, **kohya_hashes(tensors, metadata)}


def _kohya_tensors(family: Family, component: str, adapter: Adapter,
                   written: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's kohya tensors; ``written`` holds the other components' (names must not collide)."""
    import torch

    if adapter.kind != "lora":
        return _lycoris_tensors(family, component, adapter, written)
    if component == family.denoiser_name and family.kohya_modules:
        return _original_layout_tensors(family, component, adapter)
    tensors: dict[str, torch.Tensor] = {}
    known = set()
    for module in adapter.modules():
        name = kohya_module_name(family, component, module)
        if f"{name}.lora_down.weight" in written or f"{name}.lora_down.weight" in tensors:
            raise SdtuneError(f"two {component} modules have the kohya name {name}")
        down = adapter.tensors[f"{module}.lora_A.weight"]
        up = adapter.tensors.get(f"{module}.lora_B.weight")
        if up is None:
            raise SdtuneError(f"{component}: {module} has lora_A but no lora_B")
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        # Every loader scales by alpha / rank with rank = lora_down.shape[0] (kohya LoRAModule, ComfyUI
        # calculate_weight, A1111 NetworkModule.calc_scale, diffusers network_alphas), so the alpha that
        # reproduces PEFT is PEFT's own scale times that rank. diffusers' convert_state_dict_to_kohya
        # writes alpha = rank instead, which drops lora_alpha / r whenever alpha != rank.
        tensors[f"{name}.alpha"] = torch.tensor(adapter.scale(module) * down.shape[0], dtype=torch.float32)
        known |= {f"{module}.lora_A.weight", f"{module}.lora_B.weight"}
        magnitude = adapter.tensors.get(f"{module}.lora_magnitude_vector")
        if magnitude is not None:
            # PEFT's DoRA magnitude is one norm per output channel. kohya/LyCORIS name it dora_scale and
            # store it (out, 1[, 1, 1]) for that axis (LyCORIS wd_on_out=True); ComfyUI's weight_decompose
            # (comfy/weight_adapter/base.py) picks the axis by dora_scale.shape[0] == out.
            per_output = (up.shape[0], *[1] * (up.dim() - 1))
            tensors[f"{name}.dora_scale"] = magnitude.reshape(per_output).contiguous()
            known.add(f"{module}.lora_magnitude_vector")
    left = sorted(set(adapter.tensors) - known)
    if left:
        raise SdtuneError(f"{component}: {len(left)} tensors have no kohya equivalent, e.g. {left[0]}")
    return tensors


def _member_regex(member: str) -> re.Pattern[str]:
    """A ``KohyaModule`` member's template as a regex whose group is the block index:
    "transformer_blocks.{i}.attn.to_q" -> transformer_blocks\\.(\\d+)\\.attn\\.to_q."""
    return re.compile(r"(\d+)".join(map(re.escape, member.split("{i}"))))


def _block(match: re.Match[str]) -> str:
    """The block index a ``_member_regex`` match found ("" for a template without ``{i}``)."""
    return match.group(1) if match.groups() else ""


def _kohya_groups(family: Family, component: str,
                  modules: list[str]) -> dict[str, tuple[KohyaModule, dict[int, str]]]:
    """{kohya name: (its ``KohyaModule``, {member index: trained diffusers module})} for a family whose
    denoiser's kohya names are its original layout's (``Family.kohya_modules``)."""
    patterns = []
    for entry in family.kohya_modules:
        for index, member in enumerate(entry.members):
            patterns.append((_member_regex(member), entry, index))
    groups: dict[str, tuple[KohyaModule, dict[int, str]]] = {}
    for module in modules:
        found = next(((m, entry, index) for regex, entry, index in patterns if (m := regex.fullmatch(module))), None)
        if found is None:
            raise SdtuneError(f"{component}: {module} has no name in the {family.label} kohya layout (it names "
                              f"{', '.join(e.name for e in family.kohya_modules[:4])}, ...); export it with "
                              "--format diffusers, or train without it")
        match, entry, index = found
        name = family.kohya_prefixes[component] + entry.name.format(i=_block(match))
        groups.setdefault(name, (entry, {}))[1][index] = module
    return groups


def _fused_lora(entry: KohyaModule, trained: dict[int, str],
                adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of one fused Linear of the original layout from its members' LoRAs.

    Member j's LoRA (down_j (r_j, in), up_j (out_j, r_j), scale s_j) is block j of a LoRA on the fused Linear
    (out = sum out_j): down = cat(down_j) on dim 0 -> (sum r_j, in), up = block_diag(up_j) -> (sum out_j,
    sum r_j), so up @ down stacks the members' up_j @ down_j. One alpha keeps the first member's scale s
    (alpha = s x fused rank: every loader divides by down.shape[0]; q, k, v of rank r: alpha x 3); another
    member's s_j / s goes into its up_j. A member that was not trained is a zero block of the first's rank and
    its own width (``KohyaModule.widths``), which keeps the fused up block-diagonal in equal ranks: the layout
    diffusers' reader (``_convert_to_ai_toolkit_cat``) detects as "sparse" and splits back into the members'
    own LoRAs. Hand-written: diffusers and peft convert only the other way."""
    import torch

    first = trained[min(trained)]
    down_0, up_0 = adapter.tensors[f"{first}.lora_A.weight"], adapter.tensors[f"{first}.lora_B.weight"]
    scale, widths = adapter.scale(first), entry.widths or (1,) * len(entry.members)
    unit = up_0.shape[0] // widths[min(trained)]  # the output width of a member of width 1
    downs, ups = [], []
    for index in range(len(entry.members)):
        module = trained.get(index)
        if module is None:
            downs.append(torch.zeros_like(down_0))
            ups.append(torch.zeros(unit * widths[index], down_0.shape[0], dtype=up_0.dtype))
            continue
        up = adapter.tensors[f"{module}.lora_B.weight"]
        ratio = adapter.scale(module) / scale
        downs.append(adapter.tensors[f"{module}.lora_A.weight"])
        ups.append(up if ratio == 1 else up * ratio)  # x 1 left out: a renamed module's bits stay as trained
    down = torch.cat(downs, dim=0)
    return down.contiguous(), torch.block_diag(*ups).contiguous(), scale * down.shape[0]


def _fused_magnitude(component: str, name: str, entry: KohyaModule, trained: dict[int, str],
                     adapter: Adapter) -> torch.Tensor | None:
    """The DoRA magnitude (out,) of one Linear of the original layout, None without DoRA. PEFT's magnitude is
    one norm per output row of W0 + scale x up @ down; the fused Linear's rows are its members' rows in order,
    each with its own LoRA (``_fused_lora``), so its magnitude is the members' stacked, exactly. A member
    that was not trained would need its base rows' norms (a magnitude that leaves it unchanged), which the
    adapter does not hold: refused, naming it (KohyaUnavailable: a run keeps its diffusers file, says so)."""
    import torch

    magnitudes = [adapter.tensors.get(f"{m}.lora_magnitude_vector") for m in trained.values()]
    if all(m is None for m in magnitudes):
        return None
    if len(trained) < len(entry.members) or any(m is None for m in magnitudes):
        first = min(trained)
        match = _member_regex(entry.members[first]).fullmatch(trained[first])
        others = [m.format(i=_block(match) if match else "") for j, m in enumerate(entry.members) if j not in trained]
        raise KohyaUnavailable(
            f"{component}: DoRA on {', '.join(trained.values())} but not on {', '.join(others)}, which the kohya "
            f"layout fuses with them into {name}: its dora_scale needs every member's magnitudes; add "
            f"{', '.join(dict.fromkeys(o.rsplit('.', 1)[-1] for o in others))} to lora.target_modules, or use "
            "--format diffusers")
    return torch.cat([adapter.tensors[f"{trained[j]}.lora_magnitude_vector"] for j in sorted(trained)])


def _original_layout_tensors(family: Family, component: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The denoiser's kohya tensors in its original layout (``Family.kohya_modules``: FLUX.1's BFL names, SD3's
    MMDiT names, q, k, v fused into qkv): per kohya module ``NAME.lora_down.weight``, ``NAME.lora_up.weight``, ``NAME.alpha``
    (``_fused_lora``), and with DoRA ``NAME.dora_scale`` (out, 1) as ``_kohya_tensors`` writes it: a fused
    Linear's is its members' magnitudes stacked (``_fused_magnitude``)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, (entry, trained) in _kohya_groups(family, component, adapter.modules()).items():
        missing = [m for m in trained.values() if f"{m}.lora_B.weight" not in adapter.tensors]
        if missing:
            raise SdtuneError(f"{component}: {missing[0]} has lora_A but no lora_B")
        magnitude = _fused_magnitude(component, name, entry, trained, adapter)
        down, up, alpha = _fused_lora(entry, trained, adapter)
        if entry.swapped_halves_at and up.shape[0] == entry.swapped_halves_at * down.shape[1]:
            # (out, r): the original's first half of the outputs is diffusers' second (KohyaModule)
            up = torch.cat(up.chunk(2)[::-1]).contiguous()
            magnitude = None if magnitude is None else torch.cat(magnitude.chunk(2)[::-1])
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32)}
        if magnitude is not None:  # one norm per output channel, (out, 1) as _kohya_tensors writes it
            tensors[f"{name}.dora_scale"] = magnitude.reshape(up.shape[0], 1).contiguous()
    known = {f"{m}.{part}" for m in adapter.modules()
             for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    left = sorted(set(adapter.tensors) - known)
    if left:
        raise SdtuneError(f"{component}: {len(left)} tensors have no kohya equivalent, e.g. {left[0]}")
    return tensors


def _lycoris_tensors(family: Family, component: str, adapter: Adapter,
                     written: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's LoHa / LoKr in LyCORIS' layout: per module ``NAME.<factor>`` for each factor PEFT holds
    (``hada_w1_a`` ... or ``lokr_w1`` ..., the same names and shapes: PEFT's layers copy LyCORIS' modules)
    and ``NAME.alpha``, with the kohya module names of LoRA, or ``lycoris_...`` ones (``lycoris_module_name``)."""
    import torch

    names = LYCORIS_FACTORS[adapter.kind]
    tensors: dict[str, torch.Tensor] = {}
    known = set()
    for module in adapter.modules():
        name = lycoris_module_name(family, component, module)
        if f"{name}.alpha" in written or f"{name}.alpha" in tensors:
            raise SdtuneError(f"two {component} modules have the kohya name {name}")
        factors = {f: adapter.tensors[f"{module}.{f}"] for f in names if f"{module}.{f}" in adapter.tensors}
        known |= {f"{module}.{f}" for f in factors}
        factors, alpha = lycoris_alpha(adapter.kind, factors, adapter.scale(module), adapter.rank())
        tensors |= {f"{name}.{f}": t.contiguous() for f, t in factors.items()}
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    left = sorted(set(adapter.tensors) - known)
    if left:
        raise SdtuneError(f"{component}: {len(left)} tensors have no LyCORIS equivalent, e.g. {left[0]}")
    return tensors


def lycoris_alpha(kind: str, factors: dict[str, torch.Tensor], scale: float,
                  rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """(factors, alpha) to write for one module so that the loaders apply PEFT's ``scale`` (alpha / r).

    The loaders' scale: LoHa alpha / ``hada_w1_b.shape[0]`` (ComfyUI weight_adapter/loha.py, A1111
    network_hada.py via NetworkModule.calc_scale); LoKr alpha / dim, dim the rows of ``lokr_w2_b``, else of
    ``lokr_w1_b`` (ComfyUI lokr.py, A1111 network_lokr.py), and 1 when both Kronecker factors are full
    matrices, whatever alpha says (LyCORIS' own LokrModule sets alpha = lora_dim there; diffusers'
    _bake_lokr_alpha_ drops it). PEFT scales that case by alpha / r too, so a LoKr with alpha != rank and
    full factors gets PEFT's scale multiplied into ``lokr_w1`` (the Kronecker product is bilinear; x 1.0, the
    default alpha = rank, leaves the bits as they are) and alpha = ``rank``, as LyCORIS writes it."""
    if kind == "loha":
        return factors, scale * factors["hada_w1_b"].shape[0]
    dim = _lycoris_rank(factors)
    if dim:
        return factors, scale * dim
    return {**factors, "lokr_w1": factors["lokr_w1"] * scale}, float(rank)


def _network_args(adapter: Adapter) -> dict[str, str] | None:
    """kohya's ``ss_network_args`` for a LyCORIS adapter, as ``--network_module lycoris.kohya --network_args
    algo=...`` records them (strings); None for LoRA."""
    if adapter.kind == "lora":
        return None
    args = {"algo": adapter.kind}
    if adapter.kind == "lokr":
        args |= {"factor": str(int(adapter.config.get("decompose_factor", -1))),
                 "decompose_both": str(bool(adapter.config.get("decompose_both", False)))}
    if adapter.config.get("use_effective_conv2d"):
        args["use_tucker"] = "True"
    return args


def kohya_metadata(
    family: Family,
    rank: int,
    alpha: float,
    *,
    title: str = "LoRA",
    trigger_word: str | None = None,
    base_model: str | None = None,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    dora: bool = False,
    output_name: str | None = None,
    clip_skip: int | None = None,
    data: dict[str, Any] | None = None,
    network_args: dict[str, str] | None = None,
    training: dict[str, str] | None = None,
    architecture: str | None = None,
) -> dict[str, str]:
    """The safetensors metadata the UIs read and display: kohya ``ss_*`` keys and ModelSpec ``modelspec.*``.
    ``network_args`` (a LoHa's or LoKr's, ``_network_args``) makes the network module ``lycoris.kohya``.

    No path of this machine: ``base_model`` becomes ``ss_sd_model_name`` as a hub id, or a local model's
    folder or file name (``public_name``, as kohya writes it). ``data`` (a ``data_summary``) adds what
    AUTOMATIC1111 shows about the training data, as kohya's train_network.py writes it: tag frequencies from
    the captions (``ss_tag_frequency``, its "training tags"), the data folders' names and image counts,
    buckets and the start time. Like kohya's files, a published file then carries the caption tags and the
    data folders' names. ``architecture``: the model's own ModelSpec architecture (``ModelInfo.architecture``,
    e.g. FLUX.1-schnell's) in place of its family's.
    """
    v_pred = prediction_type == "v_prediction"
    version = family.kohya_version(prediction_type)
    res = resolution or version.default_resolution
    meta = {
        # kohya-ss sd-scripts train_network.py writes these as str(value)
        "ss_network_module": version.network_module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": dict(version.variant_versions).get(architecture or "", version.base_model_version),
        "ss_v2": str(version.v2),
        "ss_v_parameterization": str(v_pred),
        "ss_resolution": f"({res}, {res})",
        # Stability AI ModelSpec 1.0 (the "MUST" fields plus what the UIs show)
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or version.architecture}/lora",
        "modelspec.implementation": version.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if prediction_type == "flow_matching":  # neither noise nor v: kohya's sai_model_spec writes none for FLUX
        del meta["modelspec.prediction_type"]
    if dora:
        # networks.lora has no DoRA; LyCORIS (which wrote the first dora_scale files) reads these network args
        network_args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    if network_args:
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps(network_args)
    if trigger_word:
        meta["modelspec.trigger_phrase"] = trigger_word
        words = [w.strip() for w in trigger_word.split(",")]  # several concepts: "sks, ohwx"
        meta["modelspec.usage_hint"] = f"put '{words[0]}' in the prompt" if len(words) == 1 else \
            f"put one of {', '.join(repr(w) for w in words)} in the prompt, the identifier of the subject to draw"
    # A1111 shows these in the LoRA's metadata and names the network by ss_output_name (its alias)
    optional = {"ss_output_name": output_name, "ss_sd_model_name": public_name(base_model),
                "ss_clip_skip": None if clip_skip is None else str(int(clip_skip))}
    meta.update({k: v for k, v in optional.items() if v})
    if data:
        meta.update(_data_metadata(data))
    meta.update(training or {})
    return meta


def training_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The training settings kohya's train_network.py records (``ss_learning_rate``, ``ss_optimizer``, caption
    and loss settings, ...), from a run's config; what civitai and the UIs show of how a LoRA was made."""
    t, d = config.get("train") or {}, config.get("data") or {}
    values = {
        "ss_learning_rate": t.get("learning_rate"), "ss_max_train_steps": t.get("max_steps"),
        "ss_optimizer": t.get("optimizer"), "ss_lr_scheduler": t.get("lr_scheduler"),
        "ss_lr_warmup_steps": t.get("lr_warmup_steps"), "ss_seed": t.get("seed"),
        "ss_gradient_accumulation_steps": t.get("gradient_accumulation_steps"),
        "ss_mixed_precision": t.get("mixed_precision"), "ss_noise_offset": t.get("noise_offset"),
        "ss_min_snr_gamma": t.get("snr_gamma"), "ss_loss_type": {"mse": "l2"}.get(t.get("loss"), t.get("loss")),
        "ss_huber_c": t.get("huber_c") if t.get("loss", "mse") != "mse" else None,
        "ss_huber_schedule": t.get("huber_schedule") if t.get("loss", "mse") != "mse" else None,
        "ss_caption_dropout_rate": d.get("caption_dropout"), "ss_shuffle_caption": d.get("shuffle_tags"),
        "ss_keep_tokens": d.get("keep_tokens"), "ss_masked_loss": d.get("masked_loss"),
        "ss_flip_aug": d.get("random_flip"), "ss_enable_bucket": d.get("aspect_buckets"),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def _data_metadata(data: dict[str, Any]) -> dict[str, str]:
    """The ``ss_*`` keys of a ``data_summary``, formatted as kohya's train_network.py writes them."""
    return {
        "ss_training_started_at": str(data["training_started_at"]),  # unix time, str(time.time()) in kohya
        "ss_dataset_dirs": json.dumps(data["dataset_dirs"]),
        "ss_reg_dataset_dirs": json.dumps(data.get("reg_dataset_dirs") or {}),
        "ss_tag_frequency": json.dumps(data["tag_frequency"]),
        "ss_bucket_info": json.dumps(data.get("bucket_info")),  # "null" without aspect buckets, as kohya
    }


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash``, as kohya's train_util.precalculate_safetensors_hashes
    computes them (so AUTOMATIC1111 and the additional-networks extension need not hash the file): the file
    serialised with only its ``ss_*`` metadata; model hash = sha256 of the bytes after the header (the tensor
    data, which the other metadata does not change, so it is also A1111's hash of the written file), legacy
    hash = the first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    raw = save({k: v.contiguous() for k, v in tensors.items()},
               {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = struct.unpack("<Q", raw[:8])[0]
    return {"sshs_model_hash": hashlib.sha256(raw[8 + n:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]}


# --------------------------------------------------------------------------------------------------------
# The training data's summary (recorded by training, read by export)


@dataclass
class ImageSet:
    """One folder (or dataset) of training images as kohya counts it: its name (``public_name``: a folder's
    base name, never its path), each image's caption, and how often each image is seen per epoch."""

    name: str
    captions: list[str]
    repeats: int = 1


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """{tag: count} as kohya's train_util.BaseDataset.set_tag_frequency counts a folder: each caption split on
    commas, each tag stripped and lower-cased, empty ones left out; every image once (repeats not counted)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def bucket_info(buckets: list[tuple[int, int]], sizes: list[tuple[int, int]],
                repeats: int = 1) -> dict[str, Any]:
    """kohya's ``bucket_info`` for images trained at ``buckets`` ((w, h) each) from pictures of ``sizes``
    ((w, h) each): {"buckets": {index: {"resolution": [w, h], "count": images x repeats}},
    "mean_img_ar_error": mean |image aspect - bucket aspect|}."""
    distinct = sorted(set(buckets))
    counts = {b: buckets.count(b) * repeats for b in distinct}
    errors = [abs(w / h - bw / bh) for (w, h), (bw, bh) in zip(sizes, buckets, strict=True)]
    return {"buckets": {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(distinct)},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def data_summary(started_at: float, instance: ImageSet | list[ImageSet], reg: ImageSet | list[ImageSet] | None = None,
                 buckets: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``DATA_SUMMARY`` holds: the run's start (unix time), the instance (and class) images as kohya's
    ``dataset_dirs`` / ``reg_dataset_dirs`` and ``tag_frequency`` ({folder name: {tag: count}}; class images
    counted too, as kohya counts its regularisation folders), and ``bucket_info`` (None: square training).
    ``instance`` and ``reg`` are one folder each, or one per concept of a run with several (distinct names)."""
    instances = [instance] if isinstance(instance, ImageSet) else list(instance)
    regs = [reg] if isinstance(reg, ImageSet) else list(reg or [])
    frequency: dict[str, dict[str, int]] = {}
    for images in instances + regs:
        merged = frequency.setdefault(images.name, {})
        for tag, n in tag_frequency(images.captions).items():
            merged[tag] = merged.get(tag, 0) + n
    dirs = {i.name: {"n_repeats": i.repeats, "img_count": len(i.captions)} for i in instances}
    reg_dirs = {r.name: {"n_repeats": r.repeats, "img_count": len(r.captions)} for r in regs}
    return {"training_started_at": started_at, "dataset_dirs": dirs, "reg_dataset_dirs": reg_dirs,
            "tag_frequency": frequency, "bucket_info": buckets}


def write_data_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``DATA_SUMMARY`` into a run folder (it is never pushed: it names the data folders)."""
    path = Path(run_dir) / DATA_SUMMARY
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_data_summary(folder: str | Path) -> dict[str, Any] | None:
    """The ``DATA_SUMMARY`` of a run folder, or of the run a ``checkpoints/step-NNNNNN`` folder belongs to
    (the data cannot change within a run: a resume refuses changed data); None when there is none."""
    folder = Path(folder)
    places = [folder] + ([folder.parent.parent] if folder.parent.name == CHECKPOINTS else [])
    for place in places:
        path = place / DATA_SUMMARY
        if path.is_file():
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise SdtuneError(f"{path}: cannot read it ({type(e).__name__}); delete it to export without "
                                  "the training data's metadata") from None
            needed = {"training_started_at", "dataset_dirs", "tag_frequency"}
            if isinstance(summary, dict) and needed <= summary.keys():
                return summary
            raise SdtuneError(f"{path}: not a data summary sdtune wrote; delete it to export without the "
                              "training data's metadata")
    return None


def kohya_warnings(family: Family, adapters: dict[str, Adapter]) -> list[str]:
    """Known limits of the loaders for this LoRA, one line each (empty for the default recipes)."""
    warnings = []
    if any(k.endswith(".lora_magnitude_vector") for a in adapters.values() for k in a.tensors):
        # `sdtune sample` reads the files it writes back as DoRA (read_kohya_lora); the clients named are the
        # family's (FLUX.1 and SD3 LoRAs load in no AUTOMATIC1111)
        comfy = " and ".join(c for c in ("ComfyUI", "Forge") if c in family.lora_clients)
        a1111 = ", AUTOMATIC1111 assumes per-input magnitudes" if "AUTOMATIC1111" in family.lora_clients else ""
        warnings.append(
            f"DoRA in kohya format: {comfy} {'apply' if ' and ' in comfy else 'applies'} the per-output "
            f"dora_scale (normalising by the base weight, an approximation){a1111} and diffusers drops "
            "dora_scale keys (`sdtune sample` applies them itself); for exact DoRA elsewhere use --format "
            "diffusers or peft"
        )
    return warnings + family.kohya_warnings({c: a.modules() for c, a in adapters.items()})


def write_kohya(
    out_file: str | Path,
    family: Family,
    adapters: dict[str, Any],
    trigger_word: str | None = None,
    base_model: str | None = None,
    *,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    title: str | None = None,
    clip_skip: int | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, str] | None = None,
    bundle: dict[str, torch.Tensor] | None = None,
    architecture: str | None = None,
) -> Path:
    """Write the kohya/A1111 ``.safetensors`` for trained modules ({component: PEFT-injected module or
    ``Adapter``}); pass only what was trained. ``title`` is ``modelspec.title``, default the file's stem,
    which is always ``ss_output_name``; ``data`` is the run's ``data_summary``; ``bundle`` the pivotal-tuning
    embeddings as ``bundle_emb.<name>.<key>`` tensors (``sdtune.pivotal.bundle_tensors``); ``architecture``
    the model's ModelSpec architecture where its family's is not it (``ModelInfo.architecture``)."""
    if not family.kohya_prefixes:  # a family without kohya names would get wrong files
        raise KohyaUnavailable(f"export.kohya is not available for {family.label} yet; use the diffusers format")
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise SdtuneError(f"{out_file}: a kohya LoRA file must end in .safetensors")
    adapters = {c: m if isinstance(m, Adapter) else Adapter.from_module(m) for c, m in adapters.items()}
    tensors, metadata = to_kohya(
        family, adapters, title=title or out_file.stem, trigger_word=trigger_word, base_model=base_model,
        prediction_type=prediction_type, resolution=resolution, output_name=out_file.stem,
        clip_skip=clip_skip, data=data, training=training, architecture=architecture,
    )
    _save_safetensors({**tensors, **(bundle or {})}, out_file, metadata)
    return out_file


# --------------------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RunLora:
    """A run's (or checkpoint's) trained LoRA and the public facts about it."""

    lora_file: Path
    adapters: dict[str, Adapter]
    config: dict[str, Any]  # the run's resolved recipe (config.yaml / state.json)
    data: dict[str, Any] | None = None  # the run's DATA_SUMMARY (None: a run from before it, or unfinished)
    # pivotal tuning's embedding files: {identifier: (tensors, metadata)} (sdtune.pivotal.folder_files)
    embeddings: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return (self.config.get("model") or {}).get("pretrained")

    @property
    def trigger_word(self) -> str | None:
        data = self.config.get("data") or {}  # several concepts: every identifier
        return data.get("identifier") or ", ".join(c["identifier"] for c in data.get("concepts") or []) or None


# sdtune's diffusers file holds PEFT keys renamed by diffusers' convert_state_dict_to_diffusers
# (utils/state_dict_utils.py PEFT_TO_DIFFUSERS: lora_A -> lora.down, or lora_linear_layer.down for CLIP
# projections) for some modules and unchanged for others; this undoes it.
_DIFFUSERS_TO_PEFT_SUFFIX = (
    (".lora_linear_layer.down.weight", ".lora_A.weight"),
    (".lora_linear_layer.up.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora_B.weight"),
    (".lora_A.weight", ".lora_A.weight"),
    (".lora_B.weight", ".lora_B.weight"),
    (".lora_magnitude_vector.weight", ".lora_magnitude_vector"),
    (".lora_magnitude_vector", ".lora_magnitude_vector"),
    # a LoHa's or LoKr's: PEFT's own names, which diffusers' writer leaves as they are
    *((f".{name}", f".{name}") for names in LYCORIS_FACTORS.values() for name in names),
)


def read_diffusers_lora(
    path: str | Path, fallback_config: dict[str, Any] | None = None
) -> dict[str, Adapter]:
    """Adapters (PEFT naming) of a ``pytorch_lora_weights.safetensors`` as sdtune writes it.

    Configs come from the file's ``lora_adapter_metadata``; ``fallback_config`` (a LoraConfig dict) serves
    files without it.
    """
    import torch

    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    components = {name for family in families.registered()
                  for name in (family.denoiser_name, *(e.name for e in family.text_encoders))}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata.get("lora_adapter_metadata") or "{}").items():
        component, name = key.split(".", 1)
        configs.setdefault(component, {})[name] = value
    adapters: dict[str, Adapter] = {}
    for key, tensor in raw.items():
        component, rest = key.split(".", 1)
        if component not in components:
            raise SdtuneError(f"{path}: unexpected key {key} (not {', '.join(sorted(components))})")
        for old, new in _DIFFUSERS_TO_PEFT_SUFFIX:
            if rest.endswith(old):
                peft_key = rest[: -len(old)] + new
                break
        else:
            raise SdtuneError(f"{path}: unrecognised LoRA key {key}")
        if component not in adapters:
            adapters[component] = Adapter({}, configs.get(component) or dict(fallback_config or {}))
        adapters[component].tensors[peft_key] = tensor.to(torch.float32)
    for component, adapter in adapters.items():
        if not adapter.config.get("r"):
            raise SdtuneError(f"{path}: {component} has no rank/alpha (no adapter metadata, no config.yaml)")
        # files written under transformers 5 before sdtune wrote canonical keys hold flat CLIPTextModel keys
        if _is_clip_text_encoder(component):
            adapter.tensors = canonical_text_encoder_keys(adapter.tensors)
    return adapters


def _is_clip_text_encoder(component: str) -> bool:
    """Whether every registered family that has this component makes it a CLIP text encoder."""
    classes = {spec.model_class for family in families.registered() for spec in family.text_encoders
               if spec.name == component}
    return bool(classes) and classes <= set(CLIP_TEXT_CLASSES)


def read_run(run_dir: str | Path) -> RunLora:
    """The LoRA of a run folder or of one of its ``checkpoints/step-NNNNNN/`` folders."""
    run = Path(run_dir)
    if not run.is_dir():
        raise SdtuneError(
            f"{run}: no such run folder; point at a run folder or one of its checkpoints/step-NNNNNN folders"
        )
    lora_file = run / WEIGHT_NAME
    if not lora_file.is_file():
        raise SdtuneError(missing_lora(run, "is it a finished run or a checkpoint folder?"))
    config = run_config(run)
    lora = config.get("lora") or {}
    fallback = None
    kind = lora.get("type") or "lora"
    if lora.get("rank") and kind == "lora":  # for files without adapter metadata: the recipe's numbers
        fallback = {"r": lora["rank"], "lora_alpha": lora.get("alpha") or lora["rank"],
                    "use_dora": bool(lora.get("use_dora"))}
    elif lora.get("rank"):  # sdtune's LoHa / LoKr settings are PEFT's defaults (sdtune.lora.adapter_config)
        fallback = {"peft_type": kind.upper(), "r": lora["rank"], "alpha": lora.get("alpha") or lora["rank"]}
    return RunLora(lora_file, read_diffusers_lora(lora_file, fallback), config, read_data_summary(run),
                   folder_files(run))


def kohya_source(path: str | Path, family: Family) -> Path | None:
    """The ``pytorch_lora_weights.safetensors`` of the run or checkpoint folder a kohya file lies in, when the
    file is that LoRA converted: every tensor what ``to_kohya`` makes of it, bundled embeddings included (the
    run's own kohya file, or its export put there); None for any other file."""
    import torch

    path, folder = Path(path), Path(path).parent
    if path.name == WEIGHT_NAME or not (folder / WEIGHT_NAME).is_file() or not is_run_folder(folder):
        return None
    try:
        run = read_run(folder)
        expected: dict[str, torch.Tensor] = {}
        for component, adapter in run.adapters.items():
            expected.update(_kohya_tensors(family, component, adapter, expected))
        expected |= _bundle(run.embeddings) or {}
    except SdtuneError:  # no kohya layout for this LoRA (e.g. a fused DoRA): not its export
        return None
    with open_safetensors(path) as f:
        if set(f.keys()) != set(expected):
            return None
        for key, tensor in expected.items():
            stored = f.get_tensor(key)
            if not torch.equal(stored, tensor.to(stored.dtype)):
                return None
    return folder / WEIGHT_NAME


# --------------------------------------------------------------------------------------------------------
# Reading a LoHa / LoKr file back (for sampling)


def read_lycoris(path: str | Path, family: Family, modules: dict[str, torch.nn.Module]) -> dict[str, Adapter]:
    """The LoHa / LoKr adapters of a LoRA file, for ``sdtune.lora.inject_adapter`` into ``modules``
    ({component: module} of the base model, without adapters): sdtune's diffusers-layout file (a run's or
    checkpoint's ``pytorch_lora_weights.safetensors``: PEFT keys and configs, read as they are), or a file in
    LyCORIS' kohya naming (sdtune's kohya export, kohya + LyCORIS: ``lycoris_from_kohya``)."""
    with open_safetensors(path) as f:
        # a kohya file's bundled pivotal-tuning embeddings are not adapter tensors
        keys = [k for k in f.keys() if not k.startswith(BUNDLE_PREFIX)]
        kohya = is_kohya_file(keys, family)
        tensors = {k: f.get_tensor(k) for k in keys} if kohya else {}
    if not kohya:
        return read_diffusers_lora(path)
    return lycoris_from_kohya(tensors, family, modules, str(path))


def is_kohya_file(keys: list[str], family: Family) -> bool:
    """Whether a LoRA file's tensor names are kohya's for ``family``: its kohya prefixes (``lora_unet_``,
    ``lora_te1_``), or for a family whose kohya files name the original layout (FLUX.1, SD3) SimpleTuner's
    ``lycoris_`` names (``LYCORIS_PREFIX``), which a LoHa / LoKr that trained no text encoder has alone."""
    prefixes = (*family.kohya_prefixes.values(), *((LYCORIS_PREFIX,) if family.kohya_modules else ()))
    return any(k.startswith(prefixes) for k in keys)


def lycoris_from_kohya(tensors: dict[str, torch.Tensor], family: Family, modules: dict[str, torch.nn.Module],
                       source: str = "the LoRA file") -> dict[str, Adapter]:
    """LyCORIS tensors in kohya naming (``lora_unet_..._to_q.hada_w1_a``, ``.alpha``) -> PEFT adapters on
    ``modules``, each module found by its kohya name (``kohya_module_name`` of every Linear / Conv layer).

    Each module's loader scale (``lycoris_alpha``: alpha / rank, 1 for a LoKr of two full factors) is
    multiplied into its first factor, and the config has alpha = r (PEFT's scale 1): the same update as the
    UIs compute. Ranks may differ per module (``rank_pattern``); a LoKr's ``decompose_factor`` is the one that
    reproduces its factors' shapes (``_decompose_factor``)."""
    import torch

    kind = lycoris_kind(set(tensors))
    if kind is None:
        raise SdtuneError(f"{source}: no LoHa or LoKr tensors (hada_* / lokr_*) in it")
    places = _kohya_places(family, modules)
    allowed = {*LYCORIS_FACTORS[kind], "alpha"}
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # component -> module -> {factor: tensor}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if name not in places:
            raise SdtuneError(f"{source}: {key} names no {family.label} module of this model (another "
                              "family?)")
        if part not in allowed:
            raise SdtuneError(f"{source}: {key}: a {kind} file holds {', '.join(sorted(allowed))} per "
                              f"module; sdtune does not read '{part}' (DoRA, or LoRA keys mixed in)")
        component, module, _ = places[name]
        found.setdefault(component, {}).setdefault(module, {})[part] = tensor.to(torch.float32)
    layers = {(c, m): layer for c, m, layer in places.values()}
    return {component: _lycoris_adapter(kind, by_module, {m: layers[component, m] for m in by_module},
                                        type(modules[component]).__name__)
            for component, by_module in found.items()}


def _kohya_places(family: Family, modules: dict[str, torch.nn.Module]) -> dict[str, tuple[str, str, Any]]:
    """{kohya module name: (component, module name, layer)} for every Linear and Conv layer of ``modules``; a
    UNet's modules also under their original (LDM / SGM) names (``sdtune.ldm.original_unet_names``)."""
    import torch

    places = {}
    for component, model in modules.items():
        if component not in family.kohya_prefixes:
            continue
        # sd-scripts' SDXL files name the UNet's modules after the original (SGM) UNet: those names too
        original = original_unet_names(family, model) if component == family.denoiser_name else {}
        for name, layer in model.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                places[lycoris_module_name(family, component, name)] = (component, name, layer)
                if name in original:
                    alias = family.kohya_prefixes[component] + original[name].replace(".", "_")
                    places.setdefault(alias, (component, name, layer))
    return places


def _lycoris_adapter(kind: str, by_module: dict[str, dict[str, torch.Tensor]], layers: dict[str, Any],
                     model_class: str) -> Adapter:
    """One component's PEFT adapter from its modules' LyCORIS tensors ({module: {factor or alpha: ...}})."""
    from collections import Counter

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, parts in by_module.items():
        factors = {f: t for f, t in parts.items() if f != "alpha"}
        dim = _lycoris_rank(factors)
        alpha = parts.get("alpha")
        if alpha is not None and dim:  # the loaders' scale, into the first factor (two full LoKr ones: none)
            first = next(f for f in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if f in factors)
            factors[first] = factors[first] * (float(alpha) / dim)
        tensors |= {f"{module}.{f}": t for f, t in factors.items()}
        # two full LoKr factors: PEFT makes them full for any r >= half their larger side
        ranks[module] = dim or max(layers[module].weight.shape[:2])
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: v for m, v in ranks.items() if v != r}
    config: dict[str, Any] = {
        "peft_type": kind.upper(), "r": r, "alpha": r, "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "target_modules": sorted(by_module),
        "use_effective_conv2d": any(k.endswith((".hada_t1", ".lokr_t2")) for k in tensors),
    }
    if kind == "lokr":
        config["decompose_both"] = any(k.endswith(".lokr_w1_a") for k in tensors)
        config["decompose_factor"] = _decompose_factor(by_module, layers)
    return Adapter(canonical_text_encoder_keys(tensors, model_class), config)


def _decompose_factor(by_module: dict[str, dict[str, torch.Tensor]], layers: dict[str, Any]) -> int:
    """The LoKr ``decompose_factor`` whose split of each layer's (out, in) gives its ``lokr_w1`` shape
    (LyCORIS' and PEFT's ``factorization``: -1, the most square split, unless the file says otherwise)."""
    from peft.tuners.lokr.layer import factorization

    w1 = {m: tuple(f["lokr_w1"].shape) if "lokr_w1" in f
          else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1]) for m, f in by_module.items()}
    dims = {m: tuple(layers[m].weight.shape[:2]) for m in by_module}
    for candidate in [-1, *sorted({d for shape in w1.values() for d in shape})]:
        if all(factorization(dims[m][0], candidate)[0] == a and factorization(dims[m][1], candidate)[0] == c
               for m, (a, c) in w1.items()):
            return candidate
    raise SdtuneError("a LoKr whose Kronecker factors follow no single factorisation of its layers; PEFT "
                      "cannot rebuild it")


# --------------------------------------------------------------------------------------------------------
# Reading a kohya LoRA / DoRA file back (for sampling)

# What ``_kohya_tensors`` writes per module of a LoRA, and of a LoRA with DoRA
KOHYA_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
KOHYA_DORA_PARTS = (*KOHYA_LORA_PARTS, "dora_scale")
Converted = tuple[dict[str, "torch.Tensor"], int, float]  # one module's (PEFT tensors, rank, alpha)


def read_kohya_lora(path: str | Path, family: Family,
                    modules: dict[str, torch.nn.Module]) -> dict[str, Adapter] | None:
    """The PEFT LoRA adapters of a kohya LoRA file, DoRA where it holds ``dora_scale`` tensors, for
    ``sdtune.lora.inject_adapter`` into ``modules`` ({component: module} of the base model, as
    ``read_lycoris``); None when the file is not in a layout ``to_kohya`` writes for ``family``: a module
    named neither by its diffusers path nor, for FLUX.1 and SD3, by the original layout
    (``Family.kohya_modules``) nor by the original UNet's (sd-scripts' SDXL ``input_blocks`` names), a part other than
    these (LyCORIS' factors, a full ``diff``), or with DoRA a module without ``dora_scale`` or one
    ``dora_scale`` per input channel (LyCORIS' ``wd_on_out=False``); PEFT's DoRA holds none of these.

    ``_kohya_tensors`` in reverse: ``lora_down`` is lora_A, ``lora_up`` lora_B, ``alpha`` / rank the scale
    (PEFT's lora_alpha / r, per module through ``rank_pattern`` / ``alpha_pattern``), ``dora_scale`` (out,
    1[, 1, 1]) the magnitude; a fused Linear of the original layout is split into its members
    (``_split_fused``). Hand-written: diffusers' LoRA loaders drop ``dora_scale`` keys (lora_pipeline.py:
    "a DoRA checkpoint that is not compatible") and read no SD3 kohya file, and peft reads no kohya names."""
    import torch

    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(BUNDLE_PREFIX)}
    dora = any(k.endswith(".dora_scale") for k in tensors)
    allowed = KOHYA_DORA_PARTS if dora else KOHYA_LORA_PARTS
    places, fused = _kohya_places(family, modules), _original_layout_places(family, modules)
    found: dict[str, dict[str, torch.Tensor]] = {}  # kohya module -> {part: tensor}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if (name not in places and name not in fused) or part not in allowed:
            return None
        found.setdefault(name, {})[part] = tensor.to(torch.float32)
    converted: dict[str, dict[str, Converted]] = {}  # component -> module -> (PEFT tensors, rank, alpha)
    for name, parts in found.items():
        if name in fused:
            component, entry, block = fused[name]
            members = _split_fused(parts, entry, block, modules[component], dora)
        else:
            component, module, _ = places[name]
            one = _kohya_module(parts, dora)
            members = None if one is None else {module: one}
        if members is None:
            return None
        converted.setdefault(component, {}).update(members)
    return {component: _converted_adapter(by_module, type(modules[component]).__name__, dora)
            for component, by_module in converted.items()}


def _original_layout_places(family: Family,
                            modules: dict[str, torch.nn.Module]) -> dict[str, tuple[str, KohyaModule, str]]:
    """{kohya name: (component, its ``KohyaModule``, block index)} of the denoiser's original layout
    (``Family.kohya_modules``), for every block of ``modules``' denoiser that has the entry's first member."""
    component = family.denoiser_name
    if not family.kohya_modules or component not in modules:
        return {}
    names = [name for name, _ in modules[component].named_modules()]
    places = {}
    for entry in family.kohya_modules:
        regex = _member_regex(entry.members[0])
        for name in names:
            if match := regex.fullmatch(name):
                block = _block(match)
                places[family.kohya_prefixes[component] + entry.name.format(i=block)] = (component, entry, block)
    return places


def _split_fused(parts: dict[str, torch.Tensor], entry: KohyaModule, block: str, model: torch.nn.Module,
                 dora: bool) -> dict[str, Converted] | None:
    """{member module: (PEFT tensors, rank, alpha)} of one Linear of the original layout; None unless its
    parts are a LoRA (with ``dora`` a per-output DoRA) whose rows are its members' (their widths read from
    ``model``).

    The fused Linear's output rows are its members' in order (and DoRA's magnitude is one norm per row), so
    member j is exactly a LoRA (a DoRA) of its own: the shared down, its rows of up (and of the magnitude), at
    the file's scale (alpha / rank). Columns of its up that are zero (the other members' blocks of the
    block-diagonal up ``_fused_lora`` writes) are dropped, so q, k, v of rank r come back at rank r, not 3r; a
    file trained on the fused Linear (a dense up, as kohya's sd-scripts writes) keeps the full rank for each
    member."""
    import torch

    down, up, scale = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("dora_scale")
    if down is None or up is None or up.dim() != 2 or (dora and (scale is None or scale.numel() != up.shape[0])):
        return None
    rank = int(down.shape[0])
    lora_scale = (float(parts["alpha"]) if "alpha" in parts else rank) / rank  # no alpha: every loader's 1
    magnitude = scale.reshape(-1) if dora else None
    if entry.swapped_halves_at and up.shape[0] == entry.swapped_halves_at * down.shape[1]:
        # the original's (shift, scale) halves back into diffusers' (scale, shift) order (KohyaModule)
        up = torch.cat(up.chunk(2)[::-1])
        magnitude = None if magnitude is None else torch.cat(magnitude.chunk(2)[::-1])
    layers = dict(model.named_modules())
    members = [m.format(i=block) for m in entry.members]
    widths = [getattr(layers.get(m), "out_features", None) for m in members]
    if None in widths or sum(widths) != up.shape[0]:
        return None
    magnitudes = magnitude.split(widths) if magnitude is not None else (None,) * len(widths)
    split = {}
    all_zero = not up.any()  # (a LoRA saved before its first step): it stays one, on the first member
    for member, up_j, magnitude_j in zip(members, up.split(widths), magnitudes):
        keep = (up_j != 0).any(dim=0)
        if not keep.any():
            if not (dora or all_zero and not split):
                continue  # a member that was not trained (a zero block): no adapter on it
            keep[0] = True  # one column: the magnitude still applies (DoRA), the module stays adapted
        r = int(keep.sum())
        peft = {"lora_A.weight": down[keep].contiguous(), "lora_B.weight": up_j[:, keep].contiguous()}
        if magnitude_j is not None:
            peft["lora_magnitude_vector"] = magnitude_j.contiguous()
        split[member] = (peft, r, lora_scale * r)
    return split


def _kohya_module(parts: dict[str, torch.Tensor], dora: bool) -> Converted | None:
    """(PEFT tensors, rank, alpha) of one module's kohya LoRA parts; with ``dora`` None without a per-output
    ``dora_scale``."""
    down, up, scale = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("dora_scale")
    if down is None or up is None:
        return None
    rank = int(down.shape[0])
    # no alpha: every loader's scale is 1 (alpha = rank)
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    peft = {"lora_A.weight": down, "lora_B.weight": up}
    if not dora:
        return peft, rank, alpha
    if scale is None or scale.shape[0] != up.shape[0] or scale.numel() != up.shape[0]:  # (1, in): per input
        return None
    # PEFT's magnitude: (out,) for a Linear (up (out, r)), (1, out, 1, 1) for a Conv2d (up (out, r, 1, 1))
    peft["lora_magnitude_vector"] = scale.reshape(1, -1, 1, 1) if up.dim() == 4 else scale.reshape(-1)
    return peft, rank, alpha


def _converted_adapter(converted: dict[str, Converted], model_class: str, dora: bool) -> Adapter:
    """One component's PEFT LoRA (``dora``: DoRA) adapter from its modules' ``_kohya_module``s: the most
    common rank and alpha as ``r`` / ``lora_alpha``, the others per module (as ``_lycoris_adapter``)."""
    from collections import Counter

    r = Counter(rank for _, rank, _ in converted.values()).most_common(1)[0][0]
    alpha = Counter(a for _, _, a in converted.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_dora": dora,
        "target_modules": sorted(converted),
        "rank_pattern": {m: rank for m, (_, rank, _) in converted.items() if rank != r},
        "alpha_pattern": {m: a for m, (_, _, a) in converted.items() if a != alpha},
    }
    tensors = {f"{m}.{part}": t for m, (peft, _, _) in converted.items() for part, t in peft.items()}
    return Adapter(canonical_text_encoder_keys(tensors, model_class), config)


# --------------------------------------------------------------------------------------------------------
# Writing each format


def _public_config(config: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """A LoraConfig dict fit to publish: JSON types, and the base model as a hub id or a local model's folder
    or file name (``public_name``), never a path."""
    out = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    out["base_model_name_or_path"] = public_name(base_model or config.get("base_model_name_or_path"))
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], out_file: Path, metadata: dict[str, str]) -> None:
    """Write one .safetensors atomically, marked with sdtune's version (``MARK_KEY``: the loaders ignore
    metadata keys they do not know) so that a later export may replace it without ``--overwrite``."""
    from safetensors.torch import save_file

    with atomic_path(out_file) as tmp:  # never leave a half-written LoRA under the real name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**metadata, MARK_KEY: __version__})
        sort_metadata(tmp)  # the same bytes for the same LoRA, whatever the process


def _write_diffusers(run: RunLora, out_file: Path) -> tuple[Path, list[str]]:
    """The diffusers LoRA file, all keys in PEFT naming (``pipe.load_lora_weights(folder, weight_name=...)``),
    text-encoder keys canonical (``text_encoder.text_model.encoder...``, ``sdtune.layout``).

    Not a byte copy of the run's file: that one mixes renamed (``.lora.down``) and PEFT (``.lora_A``) keys
    when modules other than attention are trained, and diffusers' load_lora_adapter converts a state dict
    only when its first key lacks ``lora_A``, so it would drop the renamed ones. Configs keep no local path.
    """
    if out_file.suffix != ".safetensors":
        raise SdtuneError(f"{out_file}: a diffusers LoRA file must end in .safetensors")
    tensors, configs = {}, {}
    for component, adapter in run.adapters.items():
        tensors |= {f"{component}.{k}": v for k, v in adapter.tensors.items()}
        configs |= {f"{component}.{k}": v for k, v in _public_config(adapter.config, run.base_model).items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(configs, indent=2, sort_keys=True)}
    _save_safetensors(tensors, out_file, metadata)
    _write_embeddings(run, out_file)
    kinds = sorted({a.kind for a in run.adapters.values()} - {"lora"})
    warnings = [
        f"a {kind} in diffusers' layout holds PEFT's {kind} keys, which diffusers' load_lora_weights does "
        "not read (it reads LoRA keys): load it with `sdtune sample`, or use --format kohya (LyCORIS keys) "
        "for AUTOMATIC1111, ComfyUI and Forge, or --format peft" for kind in kinds]
    return out_file, warnings


def _write_peft(run: RunLora, out_dir: Path) -> tuple[Path, list[str]]:
    """One PEFT adapter folder per trained module (``OUT/unet``, ``OUT/text_encoder``,
    ``OUT/text_encoder_2``), each ``adapter_model.safetensors`` + ``adapter_config.json``.

    Keys are PEFT's own (``base_model.model.<module>.lora_A.weight``) with the module names of the canonical
    layout: a CLIPTextModel's as transformers 4.x names them (``base_model.model.text_model.encoder...``),
    the layout of every PEFT adapter saved before transformers 5. Load the UNet's with
    ``PeftModel.from_pretrained(unet, "OUT/unet")`` and a text encoder's with transformers'
    ``text_encoder.load_adapter("OUT/text_encoder")``, which maps the keys onto a transformers 5 CLIPTextModel
    (PEFT's own ``PeftModel.from_pretrained`` does not, as of peft 0.21: on transformers 5 it warns that the
    CLIPTextModel adapter keys are missing).
    """
    if out_dir.suffix == ".safetensors" or out_dir.is_file():
        raise SdtuneError(f"{out_dir}: --format peft writes a folder (one adapter per module); give a folder")
    for component, adapter in run.adapters.items():
        folder = out_dir / component
        # PeftModel.save_pretrained's naming: the model sits at base_model.model inside a PeftModel
        tensors = {f"base_model.model.{k}": v for k, v in adapter.tensors.items()}
        _save_safetensors(tensors, folder / PEFT_WEIGHTS, {"format": "pt"})
        config = _public_config(adapter.config, run.base_model)
        config.setdefault("peft_type", "LORA")
        config["inference_mode"] = True  # as PeftModel.save_pretrained writes it
        (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # an earlier export's adapters for modules this LoRA does not train (a text encoder, SDXL's second) would be
    # loaded with it: removed when sdtune wrote them (the embeddings are handled likewise, _write_embeddings)
    for stale in sorted(out_dir.glob(f"*/{PEFT_WEIGHTS}")):
        if stale.parent.name not in run.adapters and written_by_sdtune(stale):
            stale.unlink()
            (stale.parent / PEFT_CONFIG).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a file of the user's own stays, and so its folder
                stale.parent.rmdir()
    _write_embeddings(run, out_dir)
    return out_dir, []


def _write_kohya(run: RunLora, out_file: Path) -> tuple[Path, list[str]]:
    if not run.base_model:
        raise SdtuneError(
            f"{run.lora_file.parent}: no config.yaml names the base model, whose family the kohya file needs"
        )
    model = run.config.get("model") or {}
    try:
        info = inspect_model(run.base_model, model.get("revision"), prediction_type=model.get("prediction_type"),
                             base=model.get("base"))
    except SdtuneError as e:  # the run's base model moved or is not downloaded: say what needs it, and the way out
        raise SdtuneError(f"{e} (the run's model.pretrained, whose config the kohya file's names and metadata come "
                          "from); put the model back there, or export --format diffusers or peft, which need no "
                          "model") from None
    path = write_kohya(
        out_file, info.family, run.adapters, trigger_word=run.trigger_word, base_model=run.base_model,
        prediction_type=info.prediction_type,
        resolution=(run.config.get("data") or {}).get("resolution") or info.resolution,
        clip_skip=model.get("clip_skip") or 1, data=run.data, training=training_metadata(run.config),
        bundle=_bundle(run.embeddings), architecture=info.architecture,
    )
    _write_embeddings(run, path, bundled=True)  # the standalone files too: ComfyUI and Forge read no bundle
    warnings = kohya_warnings(info.family, run.adapters)
    if run.data is None:
        warnings.append(
            f"{run.lora_file.parent} has no {DATA_SUMMARY} (a run from an older sdtune, or one not "
            "finished): the kohya file has no ss_tag_frequency, ss_dataset_dirs, ss_bucket_info or "
            "ss_training_started_at, so AUTOMATIC1111 shows no training tags for it"
        )
    return path, warnings


def _bundle(embeddings: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """A run's embedding files as the kohya file's ``bundle_emb.*`` tensors (AUTOMATIC1111 loads them with the
    LoRA; ComfyUI and Forge do not yet, so the run folder keeps the files too, and an export writes them beside
    the kohya file: ``_embedding_targets``)."""
    return bundle_tensors(embeddings) if embeddings else None


def embeddings_folder(lora: str | Path) -> Path:
    """Where the pivotal-tuning embedding files of a LoRA lie (``<identifier>.safetensors`` each, the run's
    layout): ``embeddings/`` beside a run's or checkpoint's ``pytorch_lora_weights.safetensors`` and inside a
    ``--format peft`` folder; ``<file name>_embeddings/`` beside any other LoRA file (``ohwx.safetensors`` ->
    ``ohwx_embeddings/``), so that two exports into one folder keep their own (as a grid keeps
    ``<name>_cells/``)."""
    lora = Path(lora)
    if lora.suffix != ".safetensors":  # a PEFT folder (its writer refuses a .safetensors name)
        return lora / EMBEDDINGS_DIR
    return lora.parent / (EMBEDDINGS_DIR if lora.name == WEIGHT_NAME else f"{lora.stem}_{EMBEDDINGS_DIR}")


def lora_embedding_files(lora: str | Path) -> Files:
    """``{identifier: (tensors, metadata)}`` of the files in a LoRA's ``embeddings_folder``; {} when it has none."""
    folder = embeddings_folder(lora)
    return {p.stem: read_file(p) for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def _embedding_targets(run: RunLora, lora: Path, bundled: bool = False) -> list[Path]:
    """The embedding files an export to ``lora`` writes (``embeddings_folder``), one per identifier; none for a
    file that ``bundled`` them (a kohya file) in the folder of the LoRA it converts (the run's own kohya file):
    the run's ``embeddings/`` there already holds them, and sample reads the bundle."""
    if bundled and lora.parent.resolve() == run.lora_file.parent.resolve():
        return []
    return [embeddings_folder(lora) / f"{identifier}.safetensors" for identifier in run.embeddings]


def _write_embeddings(run: RunLora, lora: Path, bundled: bool = False) -> None:
    """Copy the run's embedding files into the exported LoRA's ``embeddings_folder`` (their tensors and
    metadata as they are: ``sdtune sample`` of the export renders the run's pixels), removing the files an
    earlier export of this name left there that this run has not (sample would install them with this LoRA);
    say where they went."""
    folder, targets = embeddings_folder(lora), _embedding_targets(run, lora, bundled)
    if folder.is_dir():
        for stale in sorted(folder.glob("*.safetensors")):
            if stale not in targets and written_by_sdtune(stale):
                stale.unlink()
    for target, (tensors, metadata) in zip(targets, run.embeddings.values()):
        _save_safetensors(tensors, target, metadata)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if targets:
        logger.info(f"token embeddings (pivotal tuning): {', '.join(str(t) for t in targets)} (sdtune sample reads "
                    "them with the LoRA; AUTOMATIC1111 / Forge: put them in embeddings/, ComfyUI: in "
                    "models/embeddings/)")


# --------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    """One export format: its writer, and the name training gives it in the run folder (if it writes it)."""

    write: Callable[[RunLora, Path], tuple[Path, list[str]]]  # -> (what was written, warnings)
    description: str
    run_file: str | None = None  # e.g. "{run}_kohya.safetensors"; None: training does not write it
    bundles_embeddings: bool = False  # the file holds the run's embeddings too (kohya's bundle_emb.*)


WRITERS: dict[str, Format] = {
    "diffusers": Format(_write_diffusers, "one .safetensors for diffusers' load_lora_weights"),
    "peft": Format(_write_peft, "a folder with one PEFT adapter per trained module"),
    "kohya": Format(_write_kohya, "one .safetensors for AUTOMATIC1111, ComfyUI, Forge and InvokeAI",
                    run_file="{run}" + KOHYA_SUFFIX, bundles_embeddings=True),
}


def _peft_folder_by_sdtune(folder: Path) -> bool:
    """Whether a non-empty folder is an earlier ``--format peft`` export: one or more component folders whose
    ``adapter_model.safetensors`` sdtune wrote (their ``adapter_config.json`` come with them)."""
    models = list(folder.glob(f"*/{PEFT_WEIGHTS}"))
    return bool(models) and all(written_by_sdtune(m) for m in models)


def check_export_target(run: RunLora, fmt: str, out: Path, overwrite: bool = False) -> None:
    """Refuse an ``-o`` that export must not write: a run's or checkpoint's own LoRA file, anything in a
    checkpoint folder, a run's own files of the other formats or its token embeddings, and its file of this
    format from any LoRA but the run's final one (``_run_file_kind``; never, whatever ``overwrite`` says);
    a folder for a one-file format; or an existing file (for peft: a non-empty folder) that sdtune did not
    write, unless ``overwrite``; the same for the files of its ``embeddings_folder`` (pivotal tuning)."""
    for target in _embedding_targets(run, out, WRITERS[fmt].bundles_embeddings):
        check_output_file(target, "-o", overwrite)
    if out.resolve() == run.lora_file.resolve():
        raise SdtuneError(f"-o: {out} is the run's own LoRA file; choose another name")
    if fmt == "peft":
        if out.exists() and not out.is_dir():
            raise SdtuneError(f"-o: {out} is a file; --format peft writes a folder (one adapter per module)")
        if out.is_dir() and is_run_folder(out):
            raise SdtuneError(f"-o: {out} is a run or checkpoint folder; give a new folder for the PEFT adapters")
        if out.is_dir() and any(out.iterdir()) and not overwrite and not _peft_folder_by_sdtune(out):
            raise SdtuneError(f"-o: {out} is a folder that sdtune did not export to and it is not empty; give a "
                              "new or empty folder, or pass --overwrite to write the adapters into it")
        check_output_folder(out, "-o")
        return
    if out.is_dir():
        raise SdtuneError(f"-o: {out} is a folder; give a file name ending in .safetensors")
    if out.suffix != ".safetensors":
        raise SdtuneError(f"-o: {out}: a {fmt} LoRA file must end in .safetensors")
    folder = out.parent
    if (folder / STATE).is_file() or (out.name == WEIGHT_NAME and is_run_folder(folder)):
        # A run's (or checkpoint's) files are what sample, eval, push and resume read: never replaced.
        raise SdtuneError(f"-o: {out} is in the run or checkpoint folder {folder} and would replace its "
                          f"{out.name}; choose another name")
    owned = _run_file_kind(run, fmt, out)
    if owned:
        raise SdtuneError(f"-o: {out} {owned}; choose another name")
    check_output_file(out, "-o", overwrite)


def _run_file_kind(run: RunLora, fmt: str, out: Path) -> str | None:
    """Which of a run folder's own files the one-file ``out`` is, as the end of a sentence (``"is the run's
    kohya file; ..."``); None when it is none, or when it is the run's file of this very format and ``run`` is
    that run's final LoRA (training's ``write_run_files``, or the same export again). Whatever ``--overwrite``
    says: the card, ``sample`` and ``push`` take these files for the run's own."""
    folder = out.parent
    if folder.name == EMBEDDINGS_DIR and is_run_folder(folder.parent):
        return f"is in the run's {EMBEDDINGS_DIR} folder (its pivotal-tuning token embeddings)"
    if not is_run_folder(folder):
        return None
    for other, f in WRITERS.items():
        if not (f.run_file and fnmatch(out.name, f.run_file.format(run="*"))):
            continue
        if other != fmt:
            # e.g. diffusers keys under the run's kohya name: the card and push would hand it to A1111
            return f"is the run's {other} file; a {fmt} LoRA must not take its name"
        if run.lora_file.parent.resolve() != folder.resolve():
            # another run's LoRA or one of this run's checkpoints: push would upload it as the final one
            if out.exists():
                return (f"is the run's own {other} file (its final LoRA, as push uploads it); the LoRA of "
                        f"{run.lora_file.parent} must not replace it")
            return (f"would pass for the run's own {other} file (push uploads every "
                    f"{f.run_file.format(run='*')} of a run folder as its final LoRA); the LoRA of "
                    f"{run.lora_file.parent} must not go there")
    return None


def export_run(run_dir: str | Path, fmt: str, out_file: str | Path,
               overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write the LoRA of ``run_dir`` (a run or checkpoint folder) as ``fmt`` (a key of ``WRITERS``) to
    ``out_file``; return what was written (a file, or a folder for peft) and the loaders' known limits.

    An existing ``out_file`` is replaced only when sdtune wrote it, or with ``overwrite``; a run's own LoRA
    file never (``check_export_target``)."""
    if fmt not in WRITERS:
        raise SdtuneError(f"--format: unknown format '{fmt}'; choose one of {', '.join(WRITERS)}")
    run = read_run(run_dir)
    out = Path(out_file)
    check_export_target(run, fmt, out, overwrite)
    return WRITERS[fmt].write(run, out)


def run_files(run_dir: str | Path) -> dict[str, Path]:
    """{format: file} for the formats training writes into a run folder beside its diffusers LoRA, named after
    the folder (``train.output_dir=.`` too: its real name, not "")."""
    run_dir = Path(run_dir).resolve()
    return {fmt: run_dir / f.run_file.format(run=run_dir.name) for fmt, f in WRITERS.items() if f.run_file}


def existing_run_files(run_dir: str | Path) -> dict[str, list[Path]]:
    """{format: files} of the run formats present in a folder, by their name pattern (``*_kohya.safetensors``),
    so a renamed run folder or a file exported into it counts too."""
    run_dir = Path(run_dir)
    return {fmt: sorted(run_dir.glob(f.run_file.format(run="*"))) for fmt, f in WRITERS.items() if f.run_file}


def write_run_files(run_dir: str | Path) -> list[str]:
    """Write every ``run_files`` format from the run's diffusers LoRA (as ``sdtune export`` would); return the
    loaders' known limits, one line each."""
    warnings: list[str] = []
    for fmt, path in run_files(run_dir).items():
        # the run's own files by name: training replaces them, marked or not (a run from an older sdtune)
        try:
            warnings += export_run(run_dir, fmt, path, overwrite=True)[1]
        except KohyaUnavailable as e:  # the family has no such format yet: the run has its diffusers file
            warnings.append(f"{path.name} not written: {e}")
    return warnings


def read_peft_folder(folder: str | Path) -> dict[str, Adapter]:
    """{component: Adapter} of a ``--format peft`` export (``_write_peft``): each ``COMPONENT/`` folder's
    ``adapter_model.safetensors`` + ``adapter_config.json``, or ``folder`` alone when it is one component's
    (its name is the component's). Keys lose PeftModel's ``base_model.model.`` prefix; {} when ``folder``
    holds no adapter."""
    import torch

    folder = Path(folder)
    parts = [folder] if (folder / PEFT_WEIGHTS).is_file() else sorted(p.parent for p in folder.glob(f"*/{PEFT_WEIGHTS}"))
    adapters: dict[str, Adapter] = {}
    for part in parts:
        try:
            config = json.loads((part / PEFT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SdtuneError(f"{part / PEFT_CONFIG}: cannot be read ({type(e).__name__}); a PEFT adapter needs its "
                              f"config beside {PEFT_WEIGHTS}") from None
        with open_safetensors(part / PEFT_WEIGHTS) as f:
            tensors = {k.removeprefix("base_model.model."): f.get_tensor(k).to(torch.float32) for k in f.keys()}
        # canonical text-encoder keys (text_model.encoder...), as _write_peft writes them and inject_adapter reads
        adapters[part.name] = Adapter(canonical_text_encoder_keys(tensors) if _is_clip_text_encoder(part.name)
                                      else tensors, config)
    return adapters
