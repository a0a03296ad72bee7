"""Base models: what one is, its loaded parts, and random ones built in code for tests and benchmarks.

A model is any diffusers-format pipeline folder, Hugging Face hub id, or single-file checkpoint
(``sdtune.single_file``; a FLUX.1 or SD3.x transformer file with ``model.base``, ``sdtune.transformer_file``:
``TRANSFORMER_LAYOUTS``). Its family,
prediction type and native resolution are read from the model's own config files by its family
(``sdtune.families``), never guessed from its name, and without loading any weights (so config errors can be
reported first).

torch is imported inside the functions that use it: the command line reads ``DTYPES`` for its choices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import families, flux_file, sd3_file, transformer_file
from sdtune.errors import SdtuneError, error_summary, first_line
from sdtune.families import Components, Family, ModelFiles, ModelInfo
from sdtune.files import content_hash, unhashed_bytes
from sdtune.hub import is_hub_id, offline_unless_reachable
from sdtune.layout import canonical_text_encoder_folder
from sdtune.ldm import load_original, write_single_file
from sdtune.ldm import load_vae as load_vae_file
from sdtune.runs import safetensors_header
from sdtune.single_file import CONFIG_KEY, config_folder, is_single_file, standard_vae_folder
from sdtune.tokens import write_clip_tokenizer_files

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# the transformer files a model.base goes with: FLUX.1's in Black Forest Labs' layout, SD3.x's in Stability's
TRANSFORMER_LAYOUTS = (flux_file.LAYOUT, sd3_file.LAYOUT)


def torch_dtype(name: str) -> torch.dtype:
    """fp32 / fp16 / bf16 (and Accelerate's mixed-precision names no / fp16 / bf16) -> the torch dtype."""
    import torch

    dtypes = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise SdtuneError(f"--dtype: unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return dtypes[name]


def read_transformer_file(pretrained: str) -> transformer_file.TransformerFile | None:
    """The FLUX.1 or SD3.x transformer file ``pretrained`` is (``sdtune.transformer_file``), from its header;
    None for any other model."""
    return transformer_file.read(pretrained, TRANSFORMER_LAYOUTS)


def model_files(pretrained: str, revision: str | None = None, prediction_type: str | None = None,
                base: str | None = None) -> ModelFiles:
    """The config files of a model: its own (a diffusers folder or hub id), or those derived from a single-file
    checkpoint's header (``sdtune.single_file``; ``prediction_type`` overrides what the file says). ``base``
    (``model.base``): the model a FLUX.1 or SD3.x transformer file goes with, which only such a file takes."""
    tf = read_transformer_file(pretrained)
    if tf is not None:
        return ModelFiles(pretrained, revision, folder=transformer_file.config_folder(tf, base, revision))
    if base:
        raise SdtuneError(f"model.base: only a FLUX.1 or SD3.x transformer file (in its original layout) goes "
                          f"with a base model; {pretrained} is a whole model. fix: remove model.base")
    if is_single_file(pretrained):
        _, folder = config_folder(pretrained, prediction_type)
        return ModelFiles(pretrained, revision, folder=folder)
    return ModelFiles(pretrained, revision)


def inspect_model(pretrained: str, revision: str | None = None, for_training: bool = True,
                  prediction_type: str | None = None, base: str | None = None) -> ModelInfo:
    """Family, prediction type, native resolution and bucket multiple of a model, from config files only
    (a single file's header). ``prediction_type`` (``model.prediction_type``) overrides the model's; ``base``
    is ``model.base`` (``model_files``).

    ``for_training`` refuses inpainting / depth denoisers (extra input channels), which sampling accepts."""
    return describe(model_files(pretrained, revision, prediction_type, base), for_training, prediction_type)


def describe(files: ModelFiles, for_training: bool = True, prediction_type: str | None = None) -> ModelInfo:
    """``inspect_model`` of config files already at hand (``model_files``)."""
    info = families.describe(files, for_training)
    return dataclasses.replace(info, prediction_type=prediction_type) if prediction_type else info


def load_components(
    pretrained: str,
    family: Family,
    revision: str | None = None,
    variant: str | None = None,
    allow_unsafe_pickle: bool = False,
    *,
    vae: str | None = None,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    bundled_text_encoders: bool = True,
    tokenizers: list[Any] | None = None,
) -> Components:
    """Load a model's tokenizers, text encoders, VAE, denoiser and training noise scheduler, from a diffusers
    folder, hub id or single-file checkpoint; ``vae``, ``prediction_type``, ``clip_skip``, ``base`` and
    ``bundled_text_encoders`` are the recipe's ``model.*`` options of those names (a FLUX.1 or SD3.x transformer
    file needs ``base``, and loads the text encoders it bundles unless ``bundled_text_encoders`` is off).
    ``dtype``: the denoiser and text encoders are read straight into it (``families.base.load_kwargs``; a
    single-file SD checkpoint loads as before, in float32); None: the libraries' float32. ``tokenizers``: the
    model's tokenizers already read (``load_tokenizers``: ``check_run``'s), which are then not read again.

    Weights load from safetensors only, unless ``allow_unsafe_pickle``: then .bin files are accepted too, and
    diffusers / transformers read them with torch's ``weights_only`` unpickler. Never remote code."""
    local = Path(pretrained).expanduser()
    if local.is_dir() and not allow_unsafe_pickle:
        pickles = [p for p in local.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(local.rglob("*.safetensors")):
            raise SdtuneError(
                f"model.pretrained: {pretrained} has only pickle weights ({pickles[0].name}); sdtune loads "
                "safetensors. Convert them, or set model.allow_unsafe_pickle=true (loaded with weights_only)"
            )
    tf = read_transformer_file(pretrained)
    base = base if tf else None
    try:
        if tf:
            c = load_transformer_file(tf, family, base, revision, variant, safetensors_only=not allow_unsafe_pickle,
                                      dtype=dtype, with_vae=vae is None, with_text_encoders=bundled_text_encoders,
                                      tokenizers=tokenizers)
        elif is_single_file(pretrained):
            c = load_single_file(pretrained, family, prediction_type, with_vae=vae is None, tokenizers=tokenizers)
        else:
            c = family.load(pretrained, revision, variant, safetensors_only=not allow_unsafe_pickle, dtype=dtype,
                            tokenizers=tokenizers)
    except (OSError, ValueError) as e:  # missing files, or pickle weights where safetensors are required
        raise SdtuneError(
            f"model.{'base' if tf else 'pretrained'}: could not load {base or pretrained}"
            f"{f' (variant {variant})' if variant else ''}: {first_line(e, 200)}"
        ) from None
    if vae:
        c.vae = load_vae(vae, base or pretrained, prediction_type)
    if prediction_type and c.noise_scheduler.config.prediction_type != prediction_type:
        c.noise_scheduler = type(c.noise_scheduler).from_config(c.noise_scheduler.config,
                                                                prediction_type=prediction_type)
    for encoder in c.text_encoders[:1] if clip_skip > 1 else []:
        skip_last_layers(encoder, clip_skip - 1)
    return c


def load_tokenizers(pretrained: str, family: Family, revision: str | None = None, base: str | None = None,
                    folder: Path | None = None) -> list[Any]:
    """The tokenizers ``load_components`` gives, in the family's order, without any weights: a transformer
    file's come from its ``base``, a single-file checkpoint's from its derived config ``folder``
    (``model_files``), any other model's from the model itself."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    if read_transformer_file(pretrained):
        source, kw = base, {"revision": revision}
    elif is_single_file(pretrained) and folder is not None:
        source, kw = str(folder), {}
    else:
        source, kw = pretrained, {"revision": revision}
    return [(T5TokenizerFast if spec.model_class.startswith("T5") else CLIPTokenizer)
            .from_pretrained(source, subfolder=spec.tokenizer_name, **kw) for spec in family.text_encoders]


def skip_last_layers(encoder: Any, n: int) -> None:
    """Drop a CLIP text encoder's last ``n`` layers (clip skip): its output is then the hidden state ``n``
    layers before the end, through the final layer norm, which is what AUTOMATIC1111's "Clip skip" n + 1 and
    diffusers' ``clip_skip=n`` compute, so training, in-training grids and every later sampler agree."""
    text_model = getattr(encoder, "text_model", encoder)  # transformers 5 flattens CLIPTextModel
    layers = text_model.encoder.layers
    if n >= len(layers):
        raise SdtuneError(f"model.clip_skip: {n + 1} skips all {len(layers)} layers of the text encoder; use 1 or 2")
    text_model.encoder.layers = layers[: len(layers) - n]
    encoder.config.num_hidden_layers = len(layers) - n


def load_single_file(pretrained: str, family: Family, prediction_type: str | None, with_vae: bool = True,
                     tokenizers: list[Any] | None = None) -> Components:
    """The components of a single-file checkpoint, converted by ``sdtune.ldm`` with the configs derived from its
    header (``sdtune.single_file``); the file is memory-mapped, not read twice. ``tokenizers``: already read
    (from the derived config folder), in place of reading them."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    _, folder = config_folder(pretrained, prediction_type)
    checkpoint = load_file(str(Path(pretrained).expanduser()))
    unet, vae, text_encoders = load_original(checkpoint, family, folder, with_vae=with_vae, source=pretrained)
    return Components(
        tokenizers=tokenizers or [CLIPTokenizer.from_pretrained(folder, subfolder=s.tokenizer_name)
                                  for s in family.text_encoders],
        text_encoders=text_encoders, vae=vae, denoiser=unet,
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def load_transformer_file(tf: transformer_file.TransformerFile, family: Family, base: str | None,
                          revision: str | None = None, variant: str | None = None, safetensors_only: bool = True,
                          dtype: Any = None, with_vae: bool = True, with_text_encoders: bool = True,
                          tokenizers: list[Any] | None = None) -> Components:
    """The components of a transformer file and its base: the transformer converted from the file
    (``sdtune.transformer_file``), the VAE where the file bundles one its layout reads (``with_vae``: no
    ``model.vae`` replaces it) and the text encoders it bundles (``with_text_encoders``:
    ``model.bundled_text_encoders``), whose weights in ``base`` are then not read; the rest loaded from ``base``
    by the family (at ``revision`` / ``variant``): tokenizers (unless ``tokenizers`` holds them already read),
    scheduler, the VAE and encoders the file lacks."""
    folder = transformer_file.config_folder(tf, base, revision)
    assert base is not None  # config_folder refuses a file without one
    transformer, vae = transformer_file.load(tf, folder, dtype, with_vae=with_vae)
    encoders = transformer_file.load_text_encoders(tf, folder, dtype) if with_text_encoders else {}
    c = family.load(base, revision, variant, safetensors_only, dtype=dtype, denoiser=transformer,
                    loaded_text_encoders=encoders, tokenizers=tokenizers)
    if vae is not None:
        c.vae = vae
    return c


def load_vae(vae: str, pretrained: str, prediction_type: str | None = None) -> Any:
    """``model.vae``: a VAE folder or hub id (its own config.json, or a pipeline's vae/), or a single
    ``.safetensors`` file in either layout (with the base model's VAE config)."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        if path.is_file():
            return load_vae_file(path, _vae_config_folder(pretrained, prediction_type))
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(vae, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise SdtuneError(f"model.vae: could not load {vae}: {first_line(e, 200)}") from None


def vae_problem(vae: str) -> str | None:
    """Why ``model.vae`` cannot be loaded, from config files and headers only; None if it can."""
    path = Path(vae).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return f"model.vae: {vae} is not a .safetensors file; sdtune loads no pickle weights"
        try:
            safetensors_header(path)
        except SdtuneError as e:
            return f"model.vae: {e}"
        return None
    if path.is_dir():
        if not any((path / sub / "config.json").is_file() for sub in ("", "vae")):
            return f"model.vae: {vae} has no config.json (nor vae/config.json); give a diffusers VAE folder"
        return None
    if not is_hub_id(vae):
        return f"model.vae: {vae} is neither a file, a folder nor a hub id; fix the path"
    from huggingface_hub import hf_hub_download

    offline_unless_reachable()  # no network: straight to the cache, not 25 s of retries per name
    for name in ("config.json", "vae/config.json"):
        try:
            hf_hub_download(vae, name)
            return None
        except Exception as e:  # offline, missing repo, no such file: the next name, then one line
            why = f"{error_summary(e, 120)}"
    return f"model.vae: could not get the config of '{vae}' from the hub ({why}); fix: check the id or use a local file"


def _vae_config_folder(pretrained: str, prediction_type: str | None) -> Path:
    """A folder whose ``vae/config.json`` describes the base model's VAE."""
    if is_single_file(pretrained):
        ckpt, folder = config_folder(pretrained, prediction_type)
        if (folder / "vae" / "config.json").is_file():
            return folder
        return standard_vae_folder(ckpt.family, ckpt.prediction_type)  # a checkpoint without a VAE: the usual one
    local = local_folder(pretrained)
    if local is None:
        raise SdtuneError(f"model.vae: the config of {pretrained}'s VAE is not on this machine; load the model once")
    return local


def local_folder(pretrained: str, revision: str | None = None) -> Path | None:
    """The folder a model's files are in: the local folder itself, or its snapshot in the Hugging Face cache
    (None when nothing of it is cached)."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, revision=revision, local_files_only=True))
    except Exception:  # not cached (yet): nothing to look at
        return None


def model_identity(pretrained: str, revision: str | None, subfolders: list[str], vae: str | None = None,
                   clip_skip: int = 1, base: str | None = None, bundled_text_encoders: bool = True) -> str:
    """A short hash of what a model *is*: the bytes of every file in ``subfolders`` (weights, configs,
    tokenizer files) and of ``model_index.json``, not its name. Replacing a model folder's weights, or a
    hub snapshot moving to a new commit, gives a new identity; ``sdtune.files.content_hash`` reads each file
    version once. A FLUX.1 or SD3.x transformer file is its bytes for the transformer (and a VAE and the text
    encoders it bundles, these with ``bundled_text_encoders``: ``model.bundled_text_encoders``) and ``base``
    (``model.base``) for the rest."""
    if vae or clip_skip != 1:  # model.vae and model.clip_skip make another model of the same files
        parts = [model_identity(pretrained, revision, subfolders, base=base,
                                bundled_text_encoders=bundled_text_encoders), str(clip_skip)]
        if vae:
            local = Path(vae).expanduser()
            parts.append(content_hash(local)[:16] if local.is_file() else
                         model_identity(vae, None, ["vae"] if (local / "vae").is_dir() else ["."]))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    base = base if is_single_file(pretrained) else None
    if base:
        return _paired_identity(pretrained, revision, subfolders, base, bundled_text_encoders)
    if is_single_file(pretrained):
        return content_hash(Path(pretrained).expanduser())[:16]  # one file: its bytes are the model
    folder = local_folder(pretrained, revision)
    if folder is None:
        raise SdtuneError(f"model.pretrained: {pretrained} is not in the Hugging Face cache; load it first")
    files = [folder / "model_index.json"] + sorted(
        f for sub in subfolders for f in (folder / sub).rglob("*") if f.is_file() and not f.name.startswith(".")
    )
    files = [f for f in files if f.is_file()]
    todo = unhashed_bytes(files)
    if todo > 2**30:  # the first time only: say why the start pauses
        logger.info(f"reading {todo / 2**30:.1f} GiB of {pretrained} once, to key the caches by its contents")
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(folder).as_posix()}={content_hash(f)}\n".encode())
    return h.hexdigest()[:16]


def whole_model_identity(pretrained: str, revision: str | None, family: Family, vae: str | None = None,
                         clip_skip: int = 1, base: str | None = None, bundled_text_encoders: bool = True) -> str:
    """``model_identity`` of everything a run reads of its base model: denoiser, VAE, scheduler, text encoders
    and tokenizers (the arguments are the recipe's ``model.*`` of those names)."""
    parts = [family.denoiser_name, "vae", "scheduler",
             *(n for e in family.text_encoders for n in (e.name, e.tokenizer_name))]
    return model_identity(pretrained, revision, parts, vae, clip_skip, base=base,
                          bundled_text_encoders=bundled_text_encoders)


def _paired_identity(pretrained: str, revision: str | None, subfolders: list[str], base: str,
                     bundled_text_encoders: bool = True) -> str:
    """``model_identity`` of a transformer file and its base: the base's alone where ``subfolders`` do not name
    what the file gives (the transformer, the VAE where it bundles one, and the text encoders it bundles where
    ``bundled_text_encoders``: latents and text embeddings are otherwise the base's own), else the file's bytes
    and the base's files for the other subfolders (the tokenizers are always the base's)."""
    tf = read_transformer_file(pretrained)
    given = [] if tf is None else [*(["vae"] if tf.vae else []),
                                   *(b.spec.name for b in tf.text_encoders if bundled_text_encoders)]
    own = {"transformer", *given}
    rest = [s for s in subfolders if s not in own]
    if len(rest) == len(subfolders):
        return model_identity(base, revision, subfolders)
    parts = [content_hash(Path(pretrained).expanduser())[:16], model_identity(base, revision, rest) if rest else ""]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def weight_problems(pretrained: str, revision: str | None = None) -> list[str]:
    """One line per ``.safetensors`` file of a local model (or cached hub snapshot) that cannot be whole: an
    unreadable header, or fewer bytes than its header says (a download or copy that stopped early). Reads
    headers only (``sdtune.runs.safetensors_header``), so it is as fast as the config checks."""
    if is_single_file(pretrained):
        return []  # its header is read (and checked) by sdtune.single_file whenever its configs are
    folder = local_folder(pretrained, revision)
    if folder is None:
        return []
    problems = []
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            safetensors_header(f)
        except SdtuneError as e:
            problems.append(f"model.pretrained: {e}; fix: copy or download the model again")
    return problems


def write_random_model(
    directory: str | Path, family: str, size: str = "tiny", seed: int = 0, dtype: str = "fp32", device: str = "cpu"
) -> Path:
    """Write a randomly initialised diffusers pipeline of ``family`` with the real CLIP tokenizer(s), in
    ``tiny`` (tests, 64 px) or ``full`` (the real models' shapes, for benchmarks) size; return its folder.
    ``device``: where the weights are drawn (``cuda``: FLUX.1's 17B weights in seconds instead of minutes;
    other values than the seed's ``cpu`` give other weights)."""
    import torch

    fam = families.get(family)
    weights_dtype = torch_dtype(dtype)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SdtuneError(f"{directory} exists and is not empty; choose a new folder")
    torch.manual_seed(seed)
    with torch.device(device):
        pipe: Any = fam.pipeline(fam.random_components(size))
    if weights_dtype != torch.float32:
        pipe.to(weights_dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Also the classic vocab.json + merges.txt, so older transformers (slow tokenizer) can read them too.
    for spec in (s for s in fam.text_encoders if s.model_class.startswith("CLIP")):  # not FLUX's T5
        write_clip_tokenizer_files(directory / spec.tokenizer_name)
        # transformers 5 saves a CLIPTextModel built in code without text_model.; transformers 4 and ComfyUI
        # would read that as all-missing weights (sdtune.layout)
        canonical_text_encoder_folder(directory / spec.name, spec.model_class)
    return directory


def write_random_single_file(
    path: str | Path, family: str, size: str = "tiny", seed: int = 0, dtype: str = "fp32"
) -> Path:
    """Write a randomly initialised model of ``family`` as one ``.safetensors`` checkpoint in the original
    (Stability) layout, the weights ``write_random_model`` writes for the same seed; its metadata carries its
    exact diffusers configs (``sdtune.single_file.CONFIG_KEY``) and ModelSpec's architecture and prediction type."""
    import json

    import torch

    fam = families.get(family)
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{path}: a single-file model is a .safetensors file; end the name with .safetensors")
    if fam.original_layout is None:  # the families whose whole model one checkpoint holds (sdtune.ldm)
        whole = [f.name for f in families.registered() if f.original_layout is not None]
        raise SdtuneError(f"--single-file: random checkpoints are written for {', '.join(whole)}; "
                          f"{fam.label} is written as a diffusers folder (sdtune trains on a transformer file of it "
                          "beside model.base, but writes none); fix: drop --single-file")
    torch.manual_seed(seed)
    c = fam.random_components(size)
    for module in (c.denoiser, c.vae, *c.text_encoders):
        module.to(torch_dtype(dtype))
    configs = {"unet": _plain(c.denoiser.config), "vae": _plain(c.vae.config)}
    for spec, encoder in zip(fam.text_encoders, c.text_encoders):
        configs[spec.name] = {k: v for k, v in encoder.config.to_diff_dict().items()
                              if k not in ("architectures", "transformers_version", "model_type", "dtype")}
    prediction = c.noise_scheduler.config.prediction_type
    metadata = {CONFIG_KEY: json.dumps(configs), "modelspec.architecture": fam.kohya_version(prediction).architecture,
                "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"}
    return write_single_file(c, fam, path, metadata)


def _plain(config: Any) -> dict[str, Any]:
    """A diffusers model config as JSON-ready constructor arguments."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}
