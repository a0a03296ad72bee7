"""The text encoders a transformer file bundles (``sdtune.transformer_file``): ComfyUI's all-in-one FLUX.1 files
(``flux1-dev-fp8.safetensors``: CLIP-L and T5-XXL beside the transformer, T5 often in fp8) and Stability's SD3 /
SD3.5 files (``sd3_medium_incl_clips_t5xxlfp8.safetensors``: CLIP-L, CLIP-G and T5-XXL), each encoder under
``text_encoders.<name>.`` (``clip_l``, ``clip_g``, ``t5xxl``) in one of two layouts:

- ``text_encoders.<name>.transformer.`` + the transformers model's own state dict: ``text_model.*`` and
  ``text_projection.weight`` for CLIP, ``shared.weight`` and ``encoder.*`` for T5. That is what ComfyUI saves
  (its ``SDClipModel`` wraps the model as ``transformer``, beside a ``logit_scale`` no text tower uses) and
  what diffusers' single-file loader reads from SD3 files (``convert_ldm_clip_checkpoint`` with the prefix
  ``text_encoders.clip_l.transformer.``, ``convert_sd3_t5_checkpoint_to_diffusers``).
- CLIP-G in OpenCLIP's own layout (``[model.]transformer.resblocks.N`` with the fused ``attn.in_proj_weight``,
  ``text_projection`` transposed, ``positional_embedding``, ``ln_final``), as SDXL files keep it; renamed by
  diffusers' ``convert_open_clip_checkpoint``.

Anything else under ``text_encoders.<name>.`` is refused in one line (``problem``).

``find`` tells from the header alone which encoders a file bundles and in which layout. ``problem`` checks one
against the base's config for it without reading a tensor: the encoder is built empty and the file's tensors,
as meta tensors of their header shapes, go through the same renaming as the weights do. ``load`` builds the
encoder of that config and fills it from the file, each tensor cast as it is read (fp8 to the run's dtype),
so that it is the encoder ``from_pretrained`` gives for the same weights: T5's ``wo`` stays in float32 where
transformers keeps it so, and ``shared`` and ``encoder.embed_tokens`` are one tied weight. The base's
weights for a bundled encoder are never read; its tokenizer and config still come from the base.

torch and diffusers are imported inside the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError
from sdtune.families import TextEncoderSpec
from sdtune.ldm import POSITION_IDS, text_encoder_skeleton

if TYPE_CHECKING:
    import torch

PREFIX = "text_encoders."  # ComfyUI's and Stability's, before each encoder's name
_WRAPPED = "transformer."  # the transformers model inside ComfyUI's SDClipModel
_RESBLOCKS = "transformer.resblocks."  # OpenCLIP's layer stack
_UNUSED = ("logit_scale",)  # CLIP's contrastive temperature, beside the text tower in both layouts: not read
_TIED = ("encoder.embed_tokens.weight", "shared.weight")  # T5's input embedding is its shared one
_FIX = "fix: model.bundled_text_encoders=false to use model.base's, or give the model.base the file was made for"


@dataclass(frozen=True)
class Bundled:
    """One text encoder a file bundles, as its header shows it."""

    name: str  # ComfyUI's name of it: "clip_l", "clip_g", "t5xxl"
    spec: TextEncoderSpec  # the family's encoder it stands for (``spec.name``: "text_encoder_2")
    # where its weights' names begin: "text_encoders.t5xxl.transformer." (transformers' layout), the part before
    # "transformer.resblocks." (OpenCLIP's); "" for a layout sdtune does not read
    prefix: str
    open_clip: bool
    shapes: dict[str, list[int]]  # every tensor under text_encoders.<name>., keys as in the file

    @property
    def where(self) -> str:
        return f"{PREFIX}{self.name}.*"

    @property
    def weights(self) -> list[str]:
        """The file's keys the encoder is made of."""
        return [k for k in self.shapes if self.prefix and k.startswith(self.prefix) and
                k[len(self.prefix):] not in _UNUSED]

    @property
    def foreign(self) -> list[str]:
        """The file's keys under the encoder's name that belong to no part of it."""
        weights, root = set(self.weights), f"{PREFIX}{self.name}."
        return [k for k in self.shapes if k not in weights and k[len(root):] not in _UNUSED and
                k[len(self.prefix):] not in _UNUSED]


def find(shapes: dict[str, list[int]], specs: dict[str, TextEncoderSpec]) -> list[Bundled]:
    """The text encoders among a file's tensors (``shapes``: {key: shape} from its header), for ``specs``: {ComfyUI's
    name: the family's encoder it stands for}, in that order; [] for none."""
    found = []
    for name, spec in specs.items():
        root = f"{PREFIX}{name}."
        own = {k: s for k, s in shapes.items() if k.startswith(root)}
        if own:
            found.append(_layout(name, spec, own))
    return found


def _layout(name: str, spec: TextEncoderSpec, own: dict[str, list[int]]) -> Bundled:
    resblocks = next((k for k in own if _RESBLOCKS in k), None)
    if resblocks is not None:  # OpenCLIP's layout: the CLIP-G of SD3 (open_clip=True in the family's spec)
        prefix = resblocks[: resblocks.index(_RESBLOCKS)] if spec.openclip else ""
        return Bundled(name, spec, prefix, True, own)
    wrapped = f"{PREFIX}{name}.{_WRAPPED}"
    return Bundled(name, spec, wrapped if any(k.startswith(wrapped) for k in own) else "", False, own)


# --------------------------------------------------------------------------------------------------------
# The file's names -> the encoder's


def _renamed(state: dict[str, torch.Tensor], b: Bundled, encoder: Any) -> dict[str, torch.Tensor]:
    """``state`` ({file key: tensor} of ``b.weights``) under ``encoder``'s state-dict names."""
    import torch

    if b.open_clip:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        # q, k, v split from in_proj (3 * width, width), text_projection (width, proj) transposed
        own = convert_open_clip_checkpoint(encoder, state, prefix=b.prefix)
    else:
        own = {k[len(b.prefix):]: v for k, v in state.items()}
    if not hasattr(encoder, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel; T5 has no text_model.
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    # the model's own arange, as sdtune.ldm loads SD files (some merged files carry damaged position ids)
    own = {k: v for k, v in own.items() if not k.endswith(POSITION_IDS)}
    projection = getattr(encoder, "text_projection", None)
    if projection is None:  # FLUX's CLIP-L conditions on the unprojected pooled output: ComfyUI's projection unused
        own.pop("text_projection.weight", None)
    elif "text_projection.weight" not in own and projection.in_features == projection.out_features:
        # Stability's SD3 files carry no CLIP-L projection: SD3 pools CLIP-L unprojected, which diffusers'
        # from_single_file writes as an identity projection (create_diffusers_clip_model_from_ldm)
        like = next(iter(own.values()), torch.empty(0))  # meta tensors in ``problem``, the run's dtype in ``load``
        own["text_projection.weight"] = torch.eye(projection.in_features, dtype=like.dtype, device=like.device)
    tied, shared = _TIED
    if shared in own and tied in encoder.state_dict():  # ComfyUI saves T5's one embedding once, as shared
        own.setdefault(tied, own[shared])
    return own


def _mismatch(b: Bundled, own: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """What keeps the renamed tensors ``own`` from filling the encoder whose state dict is ``wanted``."""
    missing = sorted(k for k in set(wanted) - set(own) if not k.endswith(POSITION_IDS))
    unexpected = sorted(set(own) - set(wanted))
    # the outermost first: T5's shared embedding (vocabulary, width) says more than a layer's projection
    wrong = sorted((k for k in set(own) & set(wanted) if tuple(own[k].shape) != tuple(wanted[k].shape)),
                   key=lambda k: (k.count("."), k))
    if wrong:
        k = wrong[0]
        return (f"of another shape than model.base's ({b.spec.name}/config.json): its {k} is "
                f"{tuple(own[k].shape)}, the config's {tuple(wanted[k].shape)}")
    if missing:
        return f"without {len(missing)} of its tensors (e.g. {missing[0]}): an incomplete encoder"
    if unexpected:
        return f"with {len(unexpected)} tensor(s) model.base's {b.spec.name} has no place for (e.g. {unexpected[0]})"
    return None


def _check(b: Bundled, encoder: Any, source: str) -> str | None:
    import torch

    what = f"model.pretrained: {source} bundles a {b.spec.label} text encoder ({b.where})"
    if not b.prefix:
        example = next(iter(b.shapes))
        return f"{what} in a layout sdtune does not read (e.g. {example}); {_FIX}"
    if b.foreign:
        return f"{what} with tensors outside it (e.g. {b.foreign[0]}); {_FIX}"
    meta = {k: torch.empty(b.shapes[k], device="meta") for k in b.weights}
    problem = _mismatch(b, _renamed(meta, b, encoder), encoder.state_dict())
    return f"{what} {problem}; {_FIX}" if problem else None


def problem(b: Bundled, folder: Path, source: str) -> str | None:
    """Why ``b`` cannot load into the encoder of the config in ``folder`` (``<spec.name>/config.json``, the
    base's), from the header alone; None if it can. ``source`` names the file."""
    return _check(b, text_encoder_skeleton(b.spec, folder), source)


# --------------------------------------------------------------------------------------------------------
# The weights


def _fp32_modules(encoder: Any, dtype: torch.dtype) -> set[str]:
    """The modules transformers keeps in float32 when it loads ``encoder`` in ``dtype``: T5's ``wo`` in float16
    (``PreTrainedModel._get_dtype_plan``: ``_keep_in_fp32_modules`` for float16, ``_keep_in_fp32_modules_strict``
    for float16 and bfloat16), whose activations overflow half precision."""
    import torch

    keep = set(getattr(encoder, "_keep_in_fp32_modules_strict", None) or ()) \
        if dtype in (torch.float16, torch.bfloat16) else set()
    return (keep | set(encoder._keep_in_fp32_modules or ())) if dtype == torch.float16 else keep


def load(b: Bundled, read: Callable[[str], torch.Tensor], folder: Path, dtype: torch.dtype | None,
         source: str) -> Any:
    """The encoder of the config in ``folder`` (``b.spec.model_class``), its weights read from the file by
    ``read`` (a memory-mapped file's ``get_tensor``), each cast as it is read to ``dtype`` (None: float32, what
    ``from_pretrained`` gives) but the modules transformers keeps in float32. One error naming ``source`` (the
    file) when they do not fit."""
    import torch

    encoder = text_encoder_skeleton(b.spec, folder)
    problem = _check(b, encoder, source)
    if problem:
        raise SdtuneError(problem)
    dtype = dtype or torch.float32
    keep = _fp32_modules(encoder, dtype)
    state = {}
    for key in b.weights:
        tensor = read(key)
        if tensor.is_floating_point():  # fp8 / bf16 storage computes in the run's dtype
            tensor = tensor.to(torch.float32 if keep & set(key.split(".")) else dtype)
        state[key] = tensor
    own = _renamed(state, b, encoder)
    own.update({k: v for k, v in encoder.state_dict().items() if k.endswith(POSITION_IDS)})  # transformers 4 saves it
    encoder.load_state_dict(own, strict=True, assign=True)
    encoder.tie_weights()  # one Parameter for T5's shared and encoder.embed_tokens, as from_pretrained ties them
    return encoder.eval()
