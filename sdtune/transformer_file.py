"""Transformer files: the one ``.safetensors`` file most fine-tunes of the flow-matching families are shared as
(Civitai, model pages), holding the transformer in its makers' original layout: FLUX.1's in Black Forest Labs'
(``sdtune.flux_file``), SD3 / SD3.5's MMDiT in Stability's (``sdtune.sd3_file``). ComfyUI and Stability save
it under ``model.diffusion_model.``, often in fp8 or bf16, sometimes beside a VAE (``first_stage_model.``) and
text encoders (``text_encoders.clip_l.``, ``clip_g.``, ``t5xxl.``). Such a file is ``model.pretrained`` beside
``model.base``, the diffusers model (hub id or folder) of the same family whose tokenizers and scheduler go
with it, and the text encoders and VAE the file does not bundle.

As for Stable Diffusion files (``sdtune.single_file``), the header alone says what the file is (``read``): each
family's ``Layout`` names the blocks that make its transformer and derives the diffusers config from the tensor
shapes. ``config_folder`` writes that config, with the base's other config files, once into a folder of
sdtune's cache, which stands for the model wherever sdtune reads config files (family, LoRA targets,
resolution). Nothing is fetched but the base's config files, and the base's own transformer is never read.

``load`` memory-maps the file, reads each tensor once, cast as it is read (fp8, bf16) to the dtype the model
is built in, and renames the keys with the layout's converter; a VAE the file bundles where its layout says
(``Layout.vae_prefix``) loads in place of the base's, through ``sdtune.ldm.load_vae``. ``load_text_encoders``
reads the text encoders it bundles (``Layout.text_encoders``, ``sdtune.bundled_encoders``) in the same way, into
the classes of the base's configs for them (``model.bundled_text_encoders``, on by default), whose weights are
then not read. The other parts load from the base with the family's loader (``sdtune.models.load_components``).

torch, diffusers and accelerate are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import bundled_encoders, families
from sdtune.bundled_encoders import Bundled
from sdtune.errors import SdtuneError, error_summary
from sdtune.families import ModelFiles
from sdtune.ldm import load_vae, vae_to_original
from sdtune.single_file import CONFIG_KEY, DERIVATION, cache_folder, is_single_file, read_header

if TYPE_CHECKING:
    import torch

PREFIX = "model.diffusion_model."  # the transformer's, in ComfyUI's and Stability's files and ones bundling more
# a LoRA (kohya's, PEFT's, LyCORIS') in an original layout, not a model
ADAPTER_MARKS = (".lora_", ".lora.", ".lora_A.", ".lora_B.", ".hada_", ".lokr_", ".alpha")

# (what the base gives, e.g. "T5 encoder gives 4096-wide embeddings"; that width; the width the transformer
# takes; the file's module that takes it)
Width = tuple[str, Any, int, str]


def _no_warnings(tf: TransformerFile, base: str, revision: str | None) -> list[str]:
    return []


@dataclass(frozen=True)
class Layout:
    """One family's transformer files: which keys make one, its config from the shapes, its weights' names."""

    family: str  # the sdtune family (``families.get``) of the model the pair makes
    label: str  # "FLUX.1", for messages
    name: str  # the layout, for messages: "Black Forest Labs' layout"
    model_class: str  # the diffusers transformer class
    blocks: tuple[str, ...]  # key beginnings that all occur in a whole transformer of this layout
    base_configs: tuple[str, ...]  # the base's config files the folder copies (the transformer's is derived)
    derive: Callable[[TransformerFile], dict[str, Any]]  # ``model_class``'s constructor arguments
    widths: Callable[[dict[str, Any], dict[str, dict]], list[Width]]  # (derived config, base's configs)
    variant: Callable[[TransformerFile], str]  # "FLUX.1-dev", "SD3.5 Medium"
    example_base: Callable[[TransformerFile], str]  # a hub id of a base for that variant
    to_diffusers: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]  # (state, config) -> diffusers'
    warnings: Callable[[TransformerFile, str, str | None], list[str]] = _no_warnings  # (file, base, revision)
    from_base: tuple[str, ...] = ()  # config keys the base's own transformer config gives (SD3: sample_size)
    vae_prefix: str | None = None  # where a VAE the file bundles sits, which then loads in place of the base's
    # (ComfyUI's name under text_encoders., the family's text encoder) of each encoder a file may bundle, which
    # then loads in place of the base's (model.bundled_text_encoders), in the family's order
    text_encoders: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TransformerFile:
    """What a transformer file's header says."""

    path: Path
    layout: Layout
    prefix: str  # "" or PREFIX
    shapes: dict[str, list[int]]  # the transformer's tensors, keys without the prefix
    bundled: dict[str, list[int]]  # every other tensor (a VAE, text encoders), keys as in the file
    metadata: dict[str, str]

    @property
    def vae(self) -> dict[str, list[int]]:
        """The bundled VAE's tensors that load in place of the base's (keys as in the file); {} for none."""
        prefix = self.layout.vae_prefix
        return {k: s for k, s in self.bundled.items() if k.startswith(prefix)} if prefix else {}

    @property
    def text_encoders(self) -> list[Bundled]:
        """The text encoders the file bundles (``sdtune.bundled_encoders``), in the family's order; [] for none."""
        specs = {s.name: s for s in families.get(self.layout.family).text_encoders}
        return bundled_encoders.find(self.bundled, {name: specs[c] for name, c in self.layout.text_encoders})

    @property
    def unused(self) -> list[str]:
        """The file's tensors that sdtune does not use: beside its transformer, VAE and text encoders (e.g. a VAE
        where its layout reads none: ComfyUI's FLUX files keep one under ``vae.``)."""
        used = set(self.vae).union(*(b.shapes for b in self.text_encoders))
        return [k for k in self.bundled if k not in used]

    @property
    def others(self) -> int:
        """How many tensors the file holds that sdtune does not use (``unused``)."""
        return len(self.unused)

    @property
    def variant(self) -> str:
        return self.layout.variant(self)

    @property
    def example_base(self) -> str:
        return self.layout.example_base(self)


def read(pretrained: str, layouts: Iterable[Layout]) -> TransformerFile | None:
    """The transformer file of one of ``layouts`` that ``pretrained`` is, from its header; None for any other
    model or file."""
    if not is_single_file(pretrained) or not Path(pretrained).expanduser().is_file():
        return None
    path, shapes, metadata = read_header(pretrained)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    if any(m in k for k in own for m in ADAPTER_MARKS):
        return None
    for layout in layouts:
        if all(any(k.startswith(b) for k in own) for b in layout.blocks):
            bundled = {k: s for k, s in shapes.items() if not k.startswith(prefix)}
            return TransformerFile(path, layout, prefix, own, bundled, metadata)
    return None


# --------------------------------------------------------------------------------------------------------
# Reading shapes (for the layouts' ``derive``)


def shape(tf: TransformerFile, key: str) -> list[int]:
    """The shape of the transformer's tensor ``key`` (without the prefix); one error if the file lacks it."""
    if key not in tf.shapes:
        raise SdtuneError(f"model.pretrained: {tf.path.name} has {tf.layout.label}'s blocks but no "
                          f"{tf.prefix}{key}: it is not a whole {tf.layout.label} transformer in {tf.layout.name}")
    return tf.shapes[key]


def indices(tf: TransformerFile, block: str, inner: str = "") -> list[int]:
    """The sorted N of the file's ``block``N.``inner`` keys (``indices(tf, "joint_blocks.", "x_block.attn2.")``)."""
    pattern = re.compile(re.escape(block) + r"(\d+)\." + re.escape(inner))
    return sorted({int(m.group(1)) for k in tf.shapes if (m := pattern.match(k))})


def written_config(tf: TransformerFile) -> dict[str, Any]:
    """The transformer config a file sdtune wrote carries in its metadata (``CONFIG_KEY``: tiny test models,
    whose head widths no shape says); {} for any other file."""
    try:
        config = json.loads(tf.metadata.get(CONFIG_KEY, "{}")).get("transformer", {})
    except (ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


# --------------------------------------------------------------------------------------------------------
# The base, and the folder that stands for the pair


def needs_base(tf: TransformerFile) -> str:
    """The one line that refuses a transformer file without ``model.base``."""
    label = tf.layout.label
    return (f"model.base: {tf.path.name} holds {'' if tf.bundled else 'only '}{families.article(tf.variant)} {tf.variant} transformer "
            f"({tf.layout.name}); set model.base to the {label} model whose text encoders, tokenizers, VAE and "
            f"scheduler go with it, e.g. model.base={tf.example_base} (sdtune sample: --base)")


def _read_base(tf: TransformerFile, base: str, revision: str | None) -> tuple[dict[str, dict], dict[str, Any]]:
    """({file name: config} of the base's parts other than the transformer, the ``Layout.from_base`` values of
    its own transformer config); one error naming ``model.base``."""
    label = tf.layout.label
    if is_single_file(base):
        raise SdtuneError(f"model.base: {base} is a single file; give the diffusers folder or hub id of a "
                          f"{label} model, e.g. model.base={tf.example_base}")
    files = ModelFiles(base, revision)
    try:
        family = families.detect(files)
        if family.name != tf.layout.family:
            a, other = families.article(label), families.article(family.label)
            raise SdtuneError(f"model.base: {base} is {other} {family.label} model; {a} {label} transformer file "
                              f"takes its text encoders, tokenizers, VAE and scheduler from {a} {label} model, "
                              f"e.g. model.base={tf.example_base}")
        configs = {name: files.read(name) for name in tf.layout.base_configs}
    except SdtuneError as e:  # read_model_file's lines name model.pretrained, the usual key of a model
        raise SdtuneError(str(e).replace("model.pretrained:", "model.base:", 1)) from None
    try:
        own = files.read("transformer/config.json") if tf.layout.from_base else {}
    except SdtuneError:  # a base without its own transformer: the layout's defaults
        own = {}
    return configs, {k: own[k] for k in tf.layout.from_base if k in own}


def _check_widths(tf: TransformerFile, config: dict[str, Any], configs: dict[str, dict], base: str) -> None:
    """The base's text encoders (and VAE) give the widths the transformer takes; else training would stop at
    its first step on a shape error."""
    for what, gives, takes, key in tf.layout.widths(config, configs):
        if gives != takes:
            raise SdtuneError(f"model.base: {base}'s {what}, but the transformer of {tf.path.name} takes "
                              f"{takes} ({key}); give the {tf.layout.label} model it was fine-tuned from, "
                              f"e.g. model.base={tf.example_base}")


def _write(folder: Path, model_class: str, config: dict[str, Any], configs: dict[str, dict]) -> None:
    for name, value in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": model_class, **config}, indent=2), encoding="utf-8")


def config_folder(tf: TransformerFile, base: str | None, revision: str | None = None) -> Path:
    """The folder of the pair's diffusers configs in sdtune's cache (the derived transformer config and the
    base's others, written the first time; a few KiB). ``revision`` is the base's."""
    if not base:
        raise SdtuneError(needs_base(tf))
    layout = tf.layout
    derived = layout.derive(tf)
    configs, from_base = _read_base(tf, base, revision)
    config = {**derived, **from_base}
    _check_widths(tf, config, configs, base)
    index = configs["model_index.json"]
    configs["model_index.json"] = {**index, "transformer": ["diffusers", layout.model_class]}
    key = json.dumps([DERIVATION, layout.family, config, configs], sort_keys=True)
    return cache_folder(key, lambda tmp: _write(tmp, layout.model_class, config, configs))


def pair_warnings(tf: TransformerFile, base: str, revision: str | None = None) -> list[str]:
    """What a user should know about a file and its base that does not stop a run."""
    warnings = []
    if tf.others:
        parts = [f"its transformer ({PREFIX}*)", *([f"VAE ({tf.layout.vae_prefix}*)"] if tf.vae else []),
                 *([f"text encoders ({bundled_encoders.PREFIX}*)"] if tf.text_encoders else [])]
        warnings.append(f"model.pretrained: {tf.path.name} also holds {tf.others} tensors outside "
                        f"{' and '.join(parts)}, which sdtune does not use (e.g. {tf.unused[0]}): model.base's "
                        "parts are used")
    return warnings + tf.layout.warnings(tf, base, revision)


def problems(tf: TransformerFile, folder: Path, with_vae: bool = True,
             with_text_encoders: bool = True) -> list[str]:
    """What in the file does not fit the configs in ``folder`` (built empty, on the meta device): a layout the
    derivation does not know, or a bundled VAE or text encoder of another shape than the base's, is refused
    here, not mid-load. ``with_vae``: the bundled VAE is used (no ``model.vae``); ``with_text_encoders``: the
    bundled text encoders are (``model.bundled_text_encoders``)."""
    found = [_param_count_problem(tf, folder)]
    if with_vae and tf.vae:
        found.append(_vae_problem(tf, folder))
    found += [bundled_encoders.problem(b, folder, tf.path.name) for b in tf.text_encoders if with_text_encoders]
    return [p for p in found if p]


def _param_count_problem(tf: TransformerFile, folder: Path) -> str | None:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, tf.layout.model_class)
    # buffers on the meta device too: SD3.5 Medium's position embedding table is 0.9 GB
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(cls.load_config(folder / "transformer"))
    # parameters and saved buffers (SD3's pos_embed), as the file holds them
    expected = sum(t.numel() for t in model.state_dict().values())
    found = sum(math.prod(s) for s in tf.shapes.values())
    if expected == found:
        return None
    return (f"model.pretrained: {tf.path.name} holds a transformer of {found:,} weights, but the "
            f"{tf.layout.label} architecture read from its key names has {expected:,}; sdtune cannot tell this "
            "file's layout")


def _vae_problem(tf: TransformerFile, folder: Path) -> str | None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))

    def core(shape: Iterable[int]) -> tuple[int, ...]:  # a 1x1 convolution (C, C, 1, 1) is a linear (C, C)
        return tuple(d for d in shape if d != 1)

    expected = {f"{tf.layout.vae_prefix}{k}": core(v.shape) for k, v in vae_to_original(vae).items()}
    found = {k: core(s) for k, s in tf.vae.items()}
    if found == expected:
        return None
    wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
    return (f"model.pretrained: {tf.path.name} bundles a VAE ({tf.layout.vae_prefix}*) of another kind than "
            f"model.base's (e.g. {wrong[0]}); fix: set model.vae to the VAE it was made for, or to model.base's "
            "value for the base's own")


# --------------------------------------------------------------------------------------------------------
# The weights


def load(tf: TransformerFile, folder: Path, dtype: torch.dtype | None = None,
         with_vae: bool = True) -> tuple[Any, Any | None]:
    """(the file's transformer as ``Layout.model_class`` of the config in ``folder``, in ``dtype``; its bundled
    VAE in float32, or None). ``dtype`` defaults to float32, what diffusers' ``from_pretrained`` gives a folder
    of the same weights. The file is memory-mapped and each tensor read once, cast as it is read: an fp8
    (float8_e4m3fn) or bf16 file computes in ``dtype``. ``with_vae``: load a bundled VAE (not when
    ``model.vae`` replaces it)."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open

    cls = getattr(diffusers, tf.layout.model_class)
    config = cls.load_config(folder / "transformer")
    with init_empty_weights(include_buffers=True):  # SD3's pos_embed comes from the file, not computed
        model = cls.from_config(config)
    vae_keys = set(tf.vae) if with_vae else set()
    state, vae_state = {}, {}
    with safe_open(str(tf.path), framework="pt") as f:
        for key in f.keys():
            if key in vae_keys:  # the VAE in float32, as the family loads a base's
                vae_state[key] = f.get_tensor(key).to(torch.float32)
            elif key.startswith(tf.prefix) and key[len(tf.prefix):] in tf.shapes:
                state[key[len(tf.prefix):]] = f.get_tensor(key).to(dtype or torch.float32)
    try:
        model.load_state_dict(tf.layout.to_diffusers(state, dict(config)), strict=True, assign=True)
    except (KeyError, RuntimeError) as e:
        raise SdtuneError(f"model.pretrained: {tf.path.name} does not hold the transformer its header "
                          f"describes ({error_summary(e, 160)})") from None
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:  # a buffer the state dict does not carry: the model would fail at its first step
        raise SdtuneError(f"model.pretrained: {tf.path.name} does not fill {len(empty)} tensor(s) of the "
                          f"{tf.layout.model_class} (e.g. {empty[0]})")
    vae = load_vae(vae_state, folder) if vae_state else None
    return model.eval(), vae


def load_text_encoders(tf: TransformerFile, folder: Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """{the family's component name ("text_encoder_2"): encoder} of the text encoders the file bundles, each of
    the class and config the base has for it (in ``folder``), its weights read from the memory-mapped file and
    cast as they are read to ``dtype`` (None: float32), as ``load`` reads the transformer; {} for none."""
    from safetensors import safe_open

    if not tf.text_encoders:
        return {}
    with safe_open(str(tf.path), framework="pt") as f:
        return {b.spec.name: bundled_encoders.load(b, f.get_tensor, folder, dtype, tf.path.name)
                for b in tf.text_encoders}
