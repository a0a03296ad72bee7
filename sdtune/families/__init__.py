"""Model families: which ones sdtune knows, and which one a model is.

    from sdtune import families
    family = families.get("sdxl")                 # by the name recipes and --family use
    family = families.detect(ModelFiles(path))    # from a model's config files

Adding a family: write a module beside ``sd.py`` whose class implements ``base.Family`` (see its
docstring), and register an instance below. Nothing outside this package names a family.
"""

from __future__ import annotations

from dataclasses import replace

from sdtune.errors import SdtuneError, error_summary
from sdtune.families.base import (
    Components,
    Family,
    KohyaVersion,
    MemoryConstants,
    ModelFiles,
    ModelInfo,
    OriginalLayout,
    TextEncoderSpec,
    read_model_file,
)
from sdtune.families.flux import FLUX
from sdtune.families.sd import SD2, SD15
from sdtune.families.sd3 import SD3_FAMILY
from sdtune.families.sdxl import SDXL

__all__ = [
    "Components", "Family", "KohyaVersion", "MemoryConstants", "ModelFiles", "ModelInfo", "OriginalLayout",
    "TextEncoderSpec",
    "article", "detect", "get", "names", "read_model_file", "register", "registered", "unregister",
    "with_prompt_length",
]

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to recipes, ``--family`` and model detection; returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"{family!r} does not implement sdtune.families.Family")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Forget a registered family (tests register stubs)."""
    _REGISTRY.pop(name, None)


def registered() -> list[Family]:
    """Every known family, in registration order."""
    return list(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """The names of the known families, e.g. ("sd15", "sd2", "sdxl")."""
    return tuple(_REGISTRY)


def get(name: str, key: str = "--family") -> Family:
    """The family called ``name``, or one error naming the option ``key`` and the choices."""
    if name not in _REGISTRY:
        raise SdtuneError(f"{key}: unknown family '{name}'; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def detect(files: ModelFiles) -> Family:
    """The family of the model whose config files these are (never guessed from its name)."""
    found = [f for f in _REGISTRY.values() if f.detect(files)]
    if not found:
        index = files.read("model_index.json")
        raise SdtuneError(
            f"model.pretrained: {files.pretrained} is a {index.get('_class_name', 'pipeline')} that sdtune does "
            f"not know how to train (it knows {', '.join(f.label for f in _REGISTRY.values())}); "
            "use a diffusers-format model of one of those"
        )
    return found[0]


def describe(files: ModelFiles, for_training: bool = True) -> ModelInfo:
    """What the model is (``Family.describe`` of its family); config files with values of the wrong kind (a
    damaged or hand-edited model) are one SdtuneError, not a traceback."""
    try:
        return detect(files).describe(files, for_training)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise SdtuneError(f"model.pretrained: the config files of {files.pretrained} hold unexpected values "
                          f"({error_summary(e, 120)}); is it a complete, unedited "
                          "diffusers model?") from None


def article(label: str) -> str:
    """'a' or 'an' before a family's label as it is said: an SD1.x / SDXL / SD3.x model, a FLUX.1 model."""
    return "an" if label[:1].upper() in "AEIOS" else "a"


def with_prompt_length(family: Family, tokens: int | None, key: str = "max_sequence_length") -> Family:
    """``family`` with ``tokens`` T5 tokens per prompt (a recipe's ``flux.max_sequence_length``, or ``key``); None:
    as it is. Families are frozen dataclasses: this is a copy, the registered one is unchanged."""
    if tokens is None or tokens == family.max_sequence_length:
        return family
    if family.max_sequence_length is None:
        raise SdtuneError(f"{key}: {family.label} has no T5 encoder; its prompts are CLIP's 77 tokens. fix: remove it")
    return replace(family, max_sequence_length=tokens)  # type: ignore[type-var]


# SD3 before SDXL and FLUX: an SD3 LoRA's keys (text_encoder_2., transformer.transformer_blocks.) also match
# theirs, and the first family that recognises a LoRA file owns it (SD3.recognises_lora rules theirs out)
for _family in (SD15, SD2, SD3_FAMILY, SDXL, FLUX):
    register(_family)
