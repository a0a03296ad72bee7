"""Labelled sample grids: prompts x seeds x LoRA scale x guidance x checkpoint, with a JSON sidecar per cell.

Each cell is rendered with its own CPU generator seeded with its seed, so it is the same whatever else is in
the grid, and the global random state is never touched. The sidecar holds every parameter of the cell, and
``sdtune sample --replay CELL.json`` renders the same pixels again on the same machine.

Modes, all with the LoRA applied: text-to-image, image-to-image (``init_image`` + ``strength``), inpainting
(``mask``: white = repaint), outpainting (extend the canvas, inpaint the new border) and depth-to-image when
the base model is a depth model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, PngImagePlugin
from tqdm.auto import tqdm

from sdtune import __version__, families
from sdtune.errors import Interrupted, SdtuneError, error_summary, first_line
from sdtune.export import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Adapter,
    embeddings_folder,
    kohya_source,
    lora_embedding_files,
    lycoris_kind,
    read_diffusers_lora,
    read_kohya_lora,
    read_lycoris,
    read_peft_folder,
)
from sdtune.families import Family, ModelFiles
from sdtune.files import atomic_path, sha256_file, write_text
from sdtune.grid import Cell, Settings, failed_cell, layout
from sdtune.hub import public_model_id
from sdtune.images import open_image
from sdtune.lora import inject_adapter, is_adapter_key
from sdtune.models import inspect_model, load_components, torch_dtype
from sdtune.pivotal import BUNDLE_PREFIX, Embeddings, bundle_files
from sdtune.pivotal import from_files as embeddings_from_files
from sdtune.quantize import is_quantized, quantize
from sdtune.runs import (
    SOFTWARE,
    WEIGHT_NAME,
    cell_by_sdtune,
    cells_folder,
    check_output_file,
    check_output_folder,
    grid_by_sdtune,
    open_safetensors,
    run_root,
)
from sdtune.schedulers import sampling_scheduler
from sdtune.tokens import truncated_captions

ADAPTER = "sdtune"  # adapter name under which `sdtune sample` loads a LoRA

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Rendering


def _mode_inputs(settings: Settings, init_image: Image.Image | None, mask: Image.Image | None) -> dict:
    if settings.mode == "txt2img":
        return {"height": settings.height, "width": settings.width}
    if settings.mode == "img2img":
        return {"image": init_image, "strength": settings.strength}
    if settings.mode in ("inpaint", "outpaint"):
        return {"image": init_image, "mask_image": mask, "strength": settings.strength,
                "height": init_image.height, "width": init_image.width}  # type: ignore[union-attr]
    if settings.mode == "depth":
        return {"image": init_image, "strength": settings.strength}
    raise SdtuneError(f"unknown mode {settings.mode}")


def batches(cells: list[Cell], batch_size: int) -> list[list[Cell]]:
    """The pipeline calls that render ``cells``: cells differing only in seed, ``batch_size`` at a time, in
    cell order."""
    groups: dict[Cell, list[Cell]] = {}
    for c in cells:
        groups.setdefault(replace(c, seed=0), []).append(c)
    return [members[start : start + batch_size] for members in groups.values()
            for start in range(0, len(members), batch_size)]


@torch.no_grad()
def render_cells(
    pipe: Any,
    cells: list[Cell],
    settings: Settings,
    *,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    progress: bool = False,
    adapter: str | None = None,
    batch_seeds: dict[Cell, list[int]] | None = None,
    rewrite: Callable[[str], str] | None = None,
    on_cell: Callable[[Cell, Image.Image, str | None], None] | None = None,
) -> tuple[list[Image.Image], list[str | None]]:
    """Render every cell (batched over seeds). A failing batch becomes grey cells with the reason;
    the other cells are kept. Returns (images, errors) in cell order; fills ``batch_seeds`` (if given) with
    the seeds each cell was rendered together with, in batch order (a replay must batch them the same way:
    batched kernels may round differently). ``rewrite``: what a prompt becomes before the pipeline reads it
    (pivotal tuning's identifier -> its tokens); the cells keep the prompt as written. ``on_cell(cell, image,
    error)``: called for each cell as soon as its batch is done (a failed cell: its grey image and reason), so
    that a caller can save it before the next batch renders."""
    rewrite = rewrite or str
    images: dict[Cell, Image.Image] = {}
    errors: dict[Cell, str] = {}
    bar = tqdm(total=len(cells), desc="sample", unit="img", disable=not progress)
    extra = _mode_inputs(settings, init_image, mask)
    if settings.max_sequence_length is not None:  # FluxPipeline / StableDiffusion3Pipeline's T5 prompt length
        extra["max_sequence_length"] = settings.max_sequence_length
    size = (settings.width, settings.height) if init_image is None else init_image.size
    scale = None
    try:
        for batch in batches(cells, settings.batch_size):
            key = batch[0]
            if adapter is not None and key.lora_scale is not None and key.lora_scale != scale:
                pipe.set_adapters([adapter], adapter_weights=[key.lora_scale])
                scale = key.lora_scale
            if batch_seeds is not None:
                batch_seeds.update({c: [m.seed for m in batch] for c in batch})
            _render_batch(pipe, batch, settings, extra, rewrite, images, errors)
            if on_cell is not None:
                for c in batch:
                    on_cell(c, images.get(c) or failed_cell(*size, errors[c]), errors.get(c))
            bar.update(len(batch))
    finally:  # an interrupt too: the bar's line ends before the message that follows
        bar.close()
    out_images = [images.get(c) or failed_cell(*size, errors[c]) for c in cells]
    return out_images, [errors.get(c) for c in cells]


def _render_batch(pipe: Any, batch: list[Cell], settings: Settings, extra: dict, rewrite: Callable[[str], str],
                  images: dict[Cell, Image.Image], errors: dict[Cell, str]) -> None:
    """One pipeline call for ``batch`` (cells differing only in seed): its images into ``images``, or the
    reason it failed into ``errors`` for each of its cells."""
    key = batch[0]
    try:
        out = pipe(
            # LoRA scale 0 is the base model: the identifier stays the word, not the trained tokens
            prompt=[key.prompt if key.lora_scale == 0 else rewrite(key.prompt)] * len(batch),
            negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
            num_inference_steps=settings.steps,
            guidance_scale=key.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(c.seed) for c in batch],
            **extra,
        )
        for c, im in zip(batch, out.images):
            images[c] = im
    except torch.cuda.OutOfMemoryError:
        for c in batch:
            errors[c] = "out of GPU memory (try --batch-size 1 or a smaller size)"
        torch.cuda.empty_cache()
    except (RuntimeError, ValueError) as e:
        for c in batch:
            errors[c] = first_line(e, 200)


def render_grid(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    settings: Settings,
    *,
    guidance_scale: float = 7.5,
    title: str | None = None,
    rewrite: Callable[[str], str] | None = None,
) -> Image.Image:
    """Prompts x seeds with the pipeline's adapters as they are (used for samples during training)."""
    cells = [Cell(p, s, guidance_scale=guidance_scale) for p in prompts for s in seeds]
    images, _ = render_cells(pipe, cells, settings, rewrite=rewrite)
    return layout(cells, images, title=title)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save as PNG atomically, so a crash never leaves half a picture, marked ``Software: sdtune <version>``
    (a text chunk; the pixels are untouched) so that a later command knows it may replace it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def check_outputs(out: str | Path, n_cells: int, grid: bool = True, overwrite: bool = False) -> None:
    """Refuse, before anything loads, what ``run_sample`` could not write or must not replace: ``out``
    (a folder, or a file sdtune did not write) and, for a grid, its cells folder (a file in its place, or
    cells of the same names that sdtune did not write). ``overwrite`` allows replacing foreign files."""
    out = Path(out)
    if out.is_dir():
        raise SdtuneError(f"--out: {out} is a folder; give a file name inside it, e.g. {out / 'grid.png'}")
    if out.suffix.lower() != ".png":
        raise SdtuneError(f"--out: {out}: sdtune writes PNG pictures; give a name ending in .png")
    check_output_file(out, "--out", overwrite, ours=grid_by_sdtune(out) if grid else None)
    if not grid:
        return
    cells = cells_folder(out)
    if cells.exists() and not cells.is_dir():
        raise SdtuneError(f"--out: {cells} (where the cells go) is a file; move it, or choose another --out")
    check_output_folder(cells, "--out")
    if overwrite or not cells.is_dir():
        return
    for i in range(n_cells):
        for f in (cells / f"cell-{i:04d}.png", cells / f"cell-{i:04d}.json"):
            if f.exists() and not cell_by_sdtune(f):
                raise SdtuneError(f"--out: {f} exists and sdtune did not write it; choose another --out, or pass "
                                  "--overwrite to replace it")


# --------------------------------------------------------------------------------------------------------
# Input images


def outpaint_canvas(image: Image.Image, left: int, top: int, right: int, bottom: int, multiple: int = 8):
    """Extend ``image`` by the given pixels per side (rounded up so the canvas is a multiple of 8).

    Returns (canvas, mask): the new border starts as the edge colours stretched outwards, and the mask is
    white where the model must paint."""
    w, h = image.width + left + right, image.height + top + bottom
    pad_w, pad_h = (-w) % multiple, (-h) % multiple
    right, bottom = right + pad_w, bottom + pad_h
    canvas = ImageOps.expand(image, border=(left, top, right, bottom), fill=0)
    # Fill the border with a blurred stretch of the image, a better start for the sampler than black.
    stretched = image.resize(canvas.size, Image.Resampling.BILINEAR)
    border = Image.new("L", canvas.size, 255)
    border.paste(0, (left, top, left + image.width, top + image.height))
    canvas = Image.composite(stretched, canvas, border)
    return canvas, border.convert("RGB")


@dataclass
class Request:
    """A whole `sdtune sample` invocation, as stored in each cell's sidecar."""

    model: str
    lora: list[tuple[str, str]]  # (label, file); empty: the base model alone
    cells: list[Cell]
    settings: Settings
    revision: str | None = None
    variant: str | None = None
    dtype: str = "fp32"
    device: str | None = None
    init_image: str | None = None
    mask: str | None = None
    outpaint: tuple[int, int, int, int] | None = None
    extras: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)  # model.vae / prediction_type / clip_skip / base of the run
    target: Cell | None = None  # a replay: the one cell to write (``cells`` holds its whole batch)


def with_family_defaults(req: Request) -> Request:
    """``req`` with its base model's family defaults (``Family.sampling``) where it leaves them open: cells
    whose guidance scale is None get the family's (FLUX.1-dev: 3.5), and a family that samples with one
    scheduler (FLUX: its model's flow-matching Euler) has that one in the settings, which sidecars record,
    not the --scheduler name it never used; a T5 family's prompt length (the run's ``max_sequence_length``
    option, else the model's own) is in the settings too. Reads config files only."""
    family = inspect_model(req.model, req.revision, for_training=False,
                           prediction_type=req.model_options.get("prediction_type"),
                           base=req.model_options.get("base")).family
    defaults = family.sampling
    tokens = families.with_prompt_length(family, req.model_options.get("max_sequence_length"),
                                         "--max-sequence-length").max_sequence_length

    def resolved(cell: Cell) -> Cell:
        return cell if cell.guidance_scale is not None else replace(cell, guidance_scale=defaults.guidance_scale)

    return replace(req, cells=[resolved(c) for c in req.cells], target=req.target and resolved(req.target),
                   settings=replace(req.settings, scheduler=defaults.scheduler or req.settings.scheduler,
                                    max_sequence_length=tokens))


def _load_pipeline(req: Request) -> tuple[Any, Family]:
    """The base pipeline for the request's mode, on its device and dtype (one copy of every weight)."""
    dtype = torch_dtype(req.dtype)
    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = req.model_options
    info = inspect_model(req.model, req.revision, for_training=False, prediction_type=opts.get("prediction_type"),
                         base=opts.get("base"))
    if req.settings.mode == "depth":
        pipe = _depth_pipeline(req)
    else:
        pipe = info.family.pipeline(load_components(info.pretrained, info.family, req.revision, req.variant,
                                                    vae=opts.get("vae"), prediction_type=opts.get("prediction_type"),
                                                    clip_skip=opts.get("clip_skip") or 1, base=opts.get("base"),
                                                    bundled_text_encoders=opts.get("bundled_text_encoders", True)))
        if req.settings.mode == "img2img":
            from diffusers import AutoPipelineForImage2Image

            pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        elif req.settings.mode in ("inpaint", "outpaint"):
            from diffusers import AutoPipelineForInpainting

            pipe = AutoPipelineForInpainting.from_pipe(pipe)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, req.settings.scheduler)
    # model.quantize / quantize_text_encoders of the run, or the flags: {component name: (mode, flag)}
    stored = {info.family.denoiser_name: (opts.get("quantize"), "--quantize ")} | {
        spec.name: (opts.get("quantize_text_encoders"), "--quantize-text-encoders ")
        for spec in info.family.text_encoders}
    if any(mode for mode, _ in stored.values()):  # cast on the CPU, quantized layer by layer onto the device
        pipe.to(dtype=dtype)
        for name, (mode, flag) in stored.items():
            if mode:
                module = getattr(pipe, name).requires_grad_(False)
                logger.info(quantize(module, mode, dtype, torch.device(device)).line(name, key=flag))
        pipe.to(device)  # then the rest moves; a dtype now would reinterpret NF4's packed bytes
    else:
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info.family


def _depth_pipeline(req: Request) -> Any:
    from diffusers import StableDiffusionDepth2ImgPipeline

    if "depth_estimator" not in ModelFiles(req.model, req.revision).read("model_index.json"):
        raise SdtuneError(f"--depth: {req.model} is not a depth-to-image model (it has no depth_estimator); "
                          "use e.g. stabilityai/stable-diffusion-2-depth")
    try:
        return StableDiffusionDepth2ImgPipeline.from_pretrained(
            req.model, revision=req.revision, variant=req.variant, use_safetensors=True
        )
    except (OSError, ValueError, TypeError) as e:
        raise SdtuneError(f"--depth: {req.model} is not a depth-to-image model ({first_line(e, 120)})"
                          ) from None


def lora_family(path: str | Path, prefer: Family | None = None) -> Family | None:
    """The family a LoRA file says it was made for (by its keys or kohya metadata), None if it does not say.
    Key rules overlap (an SD3 LoRA has SDXL's ``text_encoder_2.`` and FLUX's ``transformer.transformer_blocks.``
    keys): when ``prefer`` (the model's family) recognises the file too, it is the answer."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
    if prefer is not None and prefer.recognises_lora(keys, meta):
        return prefer
    return next((family for family in families.registered() if family.recognises_lora(keys, meta)), None)


def lora_digest(path: str | Path) -> str:
    """The sha256 of a LoRA file; of a PEFT adapter folder (``sdtune export --format peft``), the sha256 of its
    adapter files' names and sha256s, so that a replay notices any of them changing."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    return _files_digest(path, sorted(f for f in path.rglob("adapter_*") if f.name in (PEFT_WEIGHTS, PEFT_CONFIG)))


def embeddings_digest(path: str | Path) -> str | None:
    """The sha256 of the pivotal-tuning embedding files ``sdtune sample`` installs with a LoRA (those of its
    ``embeddings_folder``: their names and sha256s), None when it has none; recorded beside ``lora_digest``,
    which does not cover them, so that a replay notices them changing, appearing or going."""
    folder = embeddings_folder(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return _files_digest(folder, files) if files else None


def _files_digest(root: Path, files: list[Path]) -> str:
    listing = "".join(f"{f.relative_to(root).as_posix()} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _apply_lora(pipe: Any, path: str, family: Family) -> Embeddings | None:
    """Load the LoRA file (or PEFT adapter folder) into the pipeline as ``ADAPTER``, with its pivotal-tuning
    embeddings (from its ``sdtune.export.embeddings_folder``: the run's or checkpoint's ``embeddings/``, an
    export's; or bundled in a kohya file), which are returned installed. A run's own kohya file in its family's
    original layout (FLUX.1, SD3) is sampled from the run's diffusers file beside it (``kohya_source``)."""
    keys: list[str] = []
    bundle: dict[str, torch.Tensor] = {}
    if not Path(path).is_dir():
        owner = lora_family(path, prefer=family)
        if owner is not None and owner.name != family.name:  # (a schnell family is a copy: compare names)
            a = families.article(owner.label)
            raise SdtuneError(f"{path}: {a} {owner.label} LoRA cannot be applied to this {family.label} model; use "
                              f"--model with {a} {owner.label} model")
        with open_safetensors(path) as f:
            keys = list(f.keys())
            bundle = {k: f.get_tensor(k) for k in keys if k.startswith(BUNDLE_PREFIX)}
        source = kohya_source(path, family) if _kohya_denoiser_keys(family, keys) else None
        if source is not None:  # the run's pixels bit for bit: fused qkv read back may round one level apart
            logger.info(f"{Path(path).name} is the LoRA of {source} in kohya's {family.label} layout: sampling that "
                        "file instead, as the run does (the run's pixels bit for bit; its q, k, v fused into one "
                        "Linear and split back may round one level apart)")
            return _apply_lora(pipe, str(source), family)
    try:
        with _held_library_output():
            _load_adapter(pipe, path, family, keys, bundle)
    except SdtuneError as e:  # sdtune's own line about this file stands as it is
        mine = str(e) if str(e).startswith(f"{path}: ") else None
        raise SdtuneError(mine or _size_mismatch(path, family, e) or f"{path}: does not fit the base model ({e})"
                          ) from None
    except Exception as e:  # diffusers raises many types for a LoRA of another layout or rank
        raise SdtuneError(_size_mismatch(path, family, e) or _load_failure(pipe, path, family, keys, e)) from None
    loaded = [n for n, _ in getattr(pipe, family.denoiser_name).named_parameters() if is_adapter_key(n)]
    if not loaded:
        raise SdtuneError(_nothing_loaded(path, family, keys))
    files = lora_embedding_files(path) or bundle_files(bundle)
    if not files:
        return None
    embeddings = embeddings_from_files(family, files, path)
    embeddings.install([getattr(pipe, spec.tokenizer_name) for spec in family.text_encoders],
                       [getattr(pipe, spec.name) for spec in family.text_encoders])
    return embeddings


def _load_adapter(pipe: Any, path: str, family: Family, keys: list[str],
                  bundle: dict[str, torch.Tensor]) -> None:
    """Put the file's adapter into the pipeline as ``ADAPTER``: a LoHa / LoKr, a kohya file's DoRA and a
    FLUX.1 / SD3 kohya file in the layout sdtune writes with PEFT (diffusers' ``load_lora_weights`` drops
    DoRA, reads SD3's layout not at all and FLUX.1's at its own widths only), a PEFT adapter folder with PEFT,
    any other LoRA with diffusers."""
    if Path(path).is_dir():  # PEFT's own files: put in as PeftModel.from_pretrained would, not converted
        _inject_adapters(pipe, family, lambda modules: _peft_adapters(path, family, modules))
        return
    kind = lycoris_kind(keys)
    dora = kind is None and any(k.endswith(".dora_scale") for k in keys)
    if (kind or dora) and is_quantized(getattr(pipe, family.denoiser_name)):
        what = f"a {kind} file, which PEFT cannot put on quantized layers (LoRA only)" if kind else \
            "a DoRA file, whose magnitudes need the base weights themselves, not quantized ones"
        raise SdtuneError(f"--quantize: {path} is {what}; sample it without --quantize")
    if kind is not None:
        _inject_adapters(pipe, family, lambda modules: read_lycoris(path, family, modules))
        return
    if _is_sdtune_dora(path, keys):
        # diffusers 0.42 hands a text encoder's DoRA magnitudes (out,) to transformers 5 under names it does
        # not load (``lora_magnitude_vector.<adapter>``, no ``.weight``): they stayed the base weights' norms
        _inject_adapters(pipe, family, lambda modules: read_diffusers_lora(path))
        return
    if dora or _kohya_denoiser_keys(family, keys):
        # DoRA (diffusers' loader drops dora_scale), and FLUX.1 / SD3 in the original layout, which diffusers
        # reads at FLUX.1's own widths only, SD3's not at all: sdtune's reader, else diffusers' below
        if _inject_adapters(pipe, family, lambda modules: read_kohya_lora(path, family, modules)):
            return
    if dora:
        logger.warning(f"{path}: its DoRA magnitudes (dora_scale) are not applied: sdtune reads them from "
                       "kohya files in the layouts it writes (one per output channel; SD1.x, SD2.x, SDXL: diffusers "
                       "module names or the original UNet's, as sd-scripts names SDXL's; FLUX.1, SD3: the original "
                       "model's), and diffusers' loader drops them; so the images are not the "
                       "trained DoRA's (sample the run folder or its diffusers file for those)")
    if bundle:  # diffusers' kohya reader refuses keys that are not a LoRA's
        from safetensors.torch import load_file

        lora = {k: v for k, v in load_file(path).items() if k not in bundle}
        pipe.load_lora_weights(lora, adapter_name=ADAPTER)
    else:
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=ADAPTER)


def _peft_adapters(path: str, family: Family, modules: dict[str, Any]) -> dict[str, Adapter]:
    """The adapters of a PEFT adapter folder, refused when they name components this family does not have or do
    not fit their layers' widths."""
    adapters = read_peft_folder(path)
    names = (family.denoiser_name, *(spec.name for spec in family.text_encoders))
    if not adapters:
        raise SdtuneError(f"no {PEFT_WEIGHTS} in it nor in a component folder ({', '.join(names)}) of it")
    other = sorted(set(adapters) - set(names))
    if other:
        raise SdtuneError(f"it holds adapters for {', '.join(other)}, which {families.article(family.label)} "
                          f"{family.label} model does not have (it has {', '.join(names)})")
    _peft_widths(path, family, modules, adapters)
    return adapters


def _is_sdtune_dora(path: str, keys: list[str]) -> bool:
    """Whether a LoRA file is a DoRA in diffusers' layout with its PEFT configs (a run's or checkpoint's, or
    ``sdtune export --format diffusers``), which ``read_diffusers_lora`` reads."""
    if not any(k.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in keys):
        return False
    with open_safetensors(path) as f:
        return "lora_adapter_metadata" in (f.metadata() or {})


def _inject_adapters(pipe: Any, family: Family,
                     read: Callable[[dict[str, Any]], dict[str, Adapter] | None]) -> bool:
    """Put the adapters ``read`` gives for the pipeline's modules ({component: module}) in with PEFT under
    ``ADAPTER``; ``set_adapters`` (the LoRA scale) and ``unload_lora_weights`` then treat them as a LoRA that
    diffusers loaded. False when ``read`` gives None (it cannot read the file)."""
    names = (family.denoiser_name, *(spec.name for spec in family.text_encoders))
    modules = {name: getattr(pipe, name) for name in names}
    adapters = read(modules)
    if adapters is None:
        return False
    for component, adapter in adapters.items():
        inject_adapter(modules[component], adapter.config, adapter.tensors, ADAPTER)
    return True


class _Held(logging.Handler):
    """Keeps the log records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_library_output() -> Iterator[None]:
    """Hold diffusers', PEFT's and transformers' log records and warnings while a LoRA loads. A load that fails
    drops them: sdtune's one line says what is wrong, where diffusers logs a size mismatch for each of ~100 layers
    and PEFT warns with every module's name. A load that succeeds passes them on as they came (a partly matching
    LoRA's "unexpected keys" is news)."""
    held = _Held()
    saved = [(log, log.handlers[:], log.propagate)
             for log in map(logging.getLogger, ("diffusers", "peft", "transformers"))]
    for log, _, _ in saved:
        log.handlers, log.propagate = [held], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for log, handlers, propagate in saved:
            log.handlers, log.propagate = handlers, propagate
    for record in held.records:  # only after a load that succeeded: a failure has left by now
        logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


# torch's load_state_dict message, which diffusers and PEFT pass on: one line per mismatched tensor
_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _size_mismatch(path: str, family: Family, error: Exception) -> str | None:
    """One line for a LoRA made for a model of other layer widths (a size mismatch in ``error``), naming the
    first layer and its widths in the LoRA and in the model; None for any other error."""
    found = _SIZE_MISMATCH.findall(str(error))
    if not found:
        return None
    name, theirs, ours = found[0]
    module = re.sub(r"\.(lora_[AB]|lora_magnitude_vector)(\.\w+)*$", "", name)
    lora, model = ([int(d) for d in dims.split(",") if d.strip()] for dims in (theirs, ours))
    # lora_A: (rank, in[, kh, kw]), its input width; lora_B: (out, rank[, 1, 1]), its output width
    side = "input" if ".lora_A." in name else "output" if ".lora_B." in name else "size"
    lora_width, model_width = next(((a, b) for a, b in zip(lora, model) if a != b), (lora, model))
    more = f"; {len(found) - 1} more tensors differ" if len(found) > 1 else ""
    return _widths_line(path, family, f"{module}: {side} width {lora_width} in the LoRA, {model_width} in the model"
                        f"{more}")


def _widths_line(path: str, family: Family, what: str) -> str:
    return (f"{path}: does not fit the base model: made for a model of other layer widths than this {family.label} "
            f"model ({what}); use --model with the model it was trained on")


def _peft_widths(path: str, family: Family, modules: dict[str, Any], adapters: dict[str, Adapter]) -> None:
    """Refuse, in one line, a PEFT adapter whose LoRA matrices do not fit the model's layers: lora_A is (rank,
    in[, kh, kw]), lora_B (out, rank[, 1, 1]) against a Linear's (out, in) or a Conv2d's (out, in, kh, kw)
    weight. (PEFT's own error lists every layer and sdtune.lora keeps only a cut last line of it.)"""
    for component, adapter in adapters.items():
        for key, tensor in adapter.tensors.items():
            name, _, part = key.rpartition(".lora_")
            side = {"A.weight": ("input", 1), "B.weight": ("output", 0)}.get(part)
            try:
                sides = _layer_sides(modules[component].get_submodule(name))
            except AttributeError:  # a text encoder's canonical name on transformers 5: PEFT's own check stands
                continue
            if side and sides and tensor.shape[side[1]] != sides[side[1]]:
                raise SdtuneError(_widths_line(path, family, f"{name}: {side[0]} width {tensor.shape[side[1]]} in "
                                               f"the LoRA, {sides[side[1]]} in the model"))


def _layer_sides(layer: Any) -> tuple[int, int] | None:
    """(out, in) of a Linear or Conv layer from its own attributes, not its weight's shape: a bitsandbytes 4-bit
    layer (``--quantize nf4``) keeps its weight packed, shape (n, 1)."""
    if hasattr(layer, "out_features"):
        return int(layer.out_features), int(layer.in_features)
    if hasattr(layer, "out_channels"):
        return int(layer.out_channels), int(layer.in_channels)
    return None


def _kohya_denoiser_keys(family: Family, keys: list[str]) -> bool:
    """Whether a file names the denoiser in its family's original layout (a FLUX.1 or SD3 kohya LoRA)."""
    prefix = family.kohya_prefixes.get(family.denoiser_name)
    return bool(family.kohya_modules and prefix and any(k.startswith(prefix) for k in keys))


def _nothing_loaded(path: str, family: Family, keys: list[str]) -> str:
    """Why a LoRA file that loaded without an error put nothing on the denoiser, as one line."""
    if _kohya_denoiser_keys(family, keys):
        # diffusers (0.42) has no converter for SD3's kohya layout: load_lora_weights reads none of its keys;
        # sdtune's reader (read_kohya_lora) declined it: a module or part outside the layout sdtune writes
        return (f"{path}: {families.article(family.label)} {family.label} kohya file (lora_unet_ keys in the "
                "original model's layout) with modules or parts beyond the LoRA / DoRA of the blocks that sdtune "
                "writes and reads, and diffusers' LoRA loader reads none of it (ComfyUI and Forge load it); "
                f"sample the run it came from instead: its folder (sdtune sample RUN) or its {WEIGHT_NAME}")
    return f"{path}: none of its keys match this model's {family.denoiser_name} (another family or format?)"


# diffusers' FLUX kohya converter (loaders/lora_conversion_utils.py, _convert_sd_scripts_to_ai_toolkit) splits
# single_blocks_N_linear1 at FLUX.1's widths, hard-coded: q, k, v 3072 each, the MLP input 12288
FLUX1_WIDTH = 3072


def _load_failure(pipe: Any, path: str, family: Family, keys: list[str], error: Exception) -> str:
    """One line for an error diffusers raised while loading a LoRA file."""
    flux_kohya = family.name == "flux" and _kohya_denoiser_keys(family, keys)
    config = getattr(pipe, family.denoiser_name).config
    width = config.num_attention_heads * config.attention_head_dim if flux_kohya else FLUX1_WIDTH
    if isinstance(error, AssertionError) and width != FLUX1_WIDTH:
        # its assertion that the fused LoRA's rows add up to those widths fails on a model of other widths
        # (a test model): the file is not at fault
        return (f"{path}: diffusers' FLUX.1 kohya converter, which `sdtune sample` uses, needs FLUX.1's own "
                f"layer widths ({FLUX1_WIDTH}) and this model's transformer is {width} wide, so it cannot "
                "read a kohya file on this model (no fault of the file); sample the run it came from "
                f"instead: its folder (sdtune sample RUN) or its {WEIGHT_NAME}")
    return f"{path}: does not fit the base model ({error_summary(error, 160)})"


def grid_title(req: Request) -> str:
    """A grid's title: what was rendered (the checkpoint, LoRA file or run; the base model alone) and on what.
    A local base model is named by its folder's name: grids get posted, and a full path can be private."""
    model = public_model_id(req.model) or Path(req.model).name
    if not req.lora:
        return f"base model {model}"
    first_label, first_file = req.lora[0]
    if len(req.lora) == 1:
        return f"{first_label or Path(first_file).name} on {model}"
    # --checkpoints all: every file is called pytorch_lora_weights.safetensors; the run and its steps are news
    return f"{run_root(first_file).name}: {first_label} to {req.lora[-1][0]} on {model}"


UNFINISHED = "unfinished.json"  # in a grid's cells folder from its first cell until the grid is drawn


class CellFolder:
    """A grid's cells folder while the grid renders. Each cell, its PNG then its JSON sidecar, is written as
    soon as it is rendered, so an interrupted grid keeps its finished cells; ``UNFINISHED`` marks the folder
    until the grid picture is written. The same request run again on a marked folder reuses every cell whose
    sidecar is the one it would write itself (same model, LoRA bytes, settings, seeds and batch, dtype and
    device: the same pixels) and renders the rest. Any other cell there that sdtune wrote (another request's,
    or a failed cell's stale one) is removed first, so the folder only ever holds this request's cells."""

    def __init__(self, folder: Path, sidecars: dict[Cell, dict], position: dict[Cell, int]):
        self.folder, self.sidecars, self.position = folder, sidecars, position
        self.written: set[Cell] = set()  # this request's cells on disk

    def paths(self, cell: Cell) -> tuple[Path, Path]:
        """The cell's picture and its sidecar."""
        i = self.position[cell]
        return self.folder / f"cell-{i:04d}.png", self.folder / f"cell-{i:04d}.json"

    def left_over(self, skip: dict[Cell, Image.Image]) -> dict[Cell, Image.Image]:
        """The cells an unfinished run of this request left (none when the folder is not marked unfinished),
        but those in ``skip``; they count as written. Reads only."""
        if not (self.folder / UNFINISHED).is_file():
            return {}
        reused: dict[Cell, Image.Image] = {}
        for cell, sidecar in self.sidecars.items():
            image, side = self.paths(cell)
            if cell in skip or not (image.is_file() and side.is_file()):
                continue
            try:
                same = json.loads(side.read_text()) == json.loads(json.dumps(sidecar))  # tuples read back as lists
                picture = open_image(image, "cell") if same else None
            except (ValueError, SdtuneError):  # a sidecar or picture that does not read: rendered again
                continue
            if picture is not None:
                reused[cell] = picture
        self.written = set(reused)
        if reused:
            logger.info(f"reusing {len(reused)} of {len(self.position)} cells that an interrupted run of this grid "
                        f"left in {self.folder}")
        return reused

    def start(self) -> None:
        """Just before the first cell is written: remove every cell but the reused ones, and mark the folder
        unfinished."""
        keep = {f for c in self.written for f in self.paths(c)}
        # this grid's indices: check_outputs let through only sdtune's files there, or --overwrite was given
        mine = {f for c in self.position for f in self.paths(c)}
        for f in sorted(self.folder.glob("cell-*")):
            if f not in keep and (f in mine or cell_by_sdtune(f)):
                f.unlink()
        write_text(self.folder / UNFINISHED, json.dumps({"sdtune_version": __version__, "cells": len(self.position)}))

    def write(self, cell: Cell, image: Image.Image, batch_seeds: list[int] | None = None) -> None:
        """The cell's picture, then its sidecar (with the seeds it was rendered with, where not the planned
        batch): a sidecar on disk vouches for its picture."""
        image_path, sidecar_path = self.paths(cell)
        sidecar = self.sidecars[cell] | ({"batch_seeds": batch_seeds} if batch_seeds else {})
        save_image(image, image_path)
        write_text(sidecar_path, json.dumps(sidecar, indent=2))
        self.written.add(cell)

    def finish(self) -> None:
        """The grid is drawn: the folder is no longer unfinished."""
        (self.folder / UNFINISHED).unlink(missing_ok=True)

    def interrupted(self, grid: Path) -> str:
        """What an interrupt leaves, in one line."""
        n, done = len(self.position), len(self.written)
        earlier = f"; {grid} is still an earlier grid" if grid.exists() else ""
        if not done:
            return f"interrupted before the first of {n} cells was finished{earlier}"
        return (f"interrupted: {done} of {n} cells are written in {self.folder} (each with its .json sidecar); the "
                f"same command again reuses them, renders the other {n - done} and draws the grid {grid.name}"
                f"{earlier}")


def _input_images(req: Request) -> tuple[Image.Image | None, Image.Image | None]:
    """(init image, mask) of the request's mode, checked, sized and (outpainting) extended."""
    init_image = open_image(req.init_image, "--init-image") if req.init_image else None
    mask = open_image(req.mask, "--mask").convert("L") if req.mask else None
    if req.settings.mode in ("img2img", "inpaint", "outpaint", "depth") and init_image is None:
        raise SdtuneError(f"--init-image: required for {req.settings.mode}")
    if mask is not None and mask.size != init_image.size:  # type: ignore[union-attr]
        raise SdtuneError(f"--mask: {mask.size[0]}x{mask.size[1]} but the init image is "
                          f"{init_image.size[0]}x{init_image.size[1]}; they must be the same size")  # type: ignore
    if req.settings.mode == "inpaint" and mask is None:
        raise SdtuneError("--mask: required for inpainting (white = the area to repaint)")
    if req.settings.mode == "outpaint":
        init_image, mask = outpaint_canvas(init_image, *req.outpaint)  # type: ignore[arg-type, misc]
        mask = mask.convert("L")
    if init_image is not None and req.settings.mode != "outpaint":
        # Sizes must be multiples of 8 for the VAE; crop the few extra pixels rather than distort.
        w, h = init_image.width // 8 * 8, init_image.height // 8 * 8
        init_image = init_image.crop((0, 0, w, h))
        mask = mask.crop((0, 0, w, h)) if mask is not None else None
    return init_image, mask


def _absolute(req: Request) -> Request:
    """``req`` with absolute paths for everything local: sidecars must replay from anywhere."""

    def absolute(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    options = {**req.model_options, **{k: absolute(req.model_options[k]) for k in ("vae", "base")
                                       if req.model_options.get(k)}}
    return replace(req, model=absolute(req.model), init_image=absolute(req.init_image), mask=absolute(req.mask),
                   model_options=options, lora=[(label, absolute(f)) for label, f in req.lora],
                   device=req.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _sidecars(req: Request) -> dict[Cell, dict]:
    """Every cell's sidecar as it will be written. Its ``batch_seeds`` is the batch the cell is rendered in
    (a given cell's: the one it would have been rendered in), so that its replay batches the same."""
    sidecars: dict[Cell, dict] = {}
    for label, lora_file in req.lora or [(None, None)]:
        cells = [c for c in req.cells if c.checkpoint == label]
        lora_sha256 = lora_digest(lora_file) if lora_file else None  # once per file, not once per cell
        embeddings_sha256 = embeddings_digest(lora_file) if lora_file else None
        for batch in batches(cells, req.settings.batch_size):
            for c in batch:
                sidecars[c] = {
                    "sdtune_version": __version__, "model": req.model, "revision": req.revision,
                    "variant": req.variant, "lora": lora_file, "lora_sha256": lora_sha256,
                    "embeddings_sha256": embeddings_sha256, "cell": asdict(c),
                    "settings": asdict(req.settings), "dtype": req.dtype, "device": req.device,
                    "init_image": req.init_image, "mask": req.mask, "outpaint": req.outpaint,
                    "model_options": req.model_options, "batch_seeds": [m.seed for m in batch],
                }
    return sidecars


def run_sample(req: Request, out: Path, progress: bool = True, grid: bool = True,
               given: dict[Cell, Image.Image] | None = None) -> tuple[Path, list[str]]:
    """Render the request's grid to ``out`` and each cell (+ JSON sidecar) to ``<out stem>_cells/`` as soon as
    it is rendered (``CellFolder``: an interrupted grid keeps its finished cells, and the same request again
    resumes it); with ``grid=False`` (a replay) just the first cell's image to ``out``. ``given``: cells
    already rendered elsewhere, exactly as this request would render them (eval's base-model cells); they are
    written and drawn, not rendered again, and the model is not loaded if every cell is given or reused.
    Returns (path written, one line per failed cell). Ctrl-C while a grid renders raises ``Interrupted``
    (exit code 130) saying how many cells are on disk and where."""
    init_image, mask = _input_images(req)
    req = with_family_defaults(_absolute(req))
    sidecars = _sidecars(req)
    folder = CellFolder(cells_folder(out), sidecars, {c: i for i, c in enumerate(req.cells)}) if grid else None
    known = dict(given or {})
    try:
        known |= folder.left_over(known) if folder else {}
        pipe, family = _load_pipeline(req) if any(c not in known for c in req.cells) else (None, None)
        if pipe is not None:
            _warn_truncated(pipe, family, req)  # type: ignore[arg-type]
        if folder is not None:  # the folder changes only once the model has loaded: a load may fail
            folder.start()
        images, failures = _render_all(req, pipe, family, known, folder, (init_image, mask), progress)
    except KeyboardInterrupt:
        if folder is None:
            raise
        raise Interrupted(folder.interrupted(out), 130) from None
    if folder is None:
        return save_image(images[req.target or req.cells[0]], out), failures
    written = save_image(layout(req.cells, [images[c] for c in req.cells], title=grid_title(req)), out)
    folder.finish()
    return written, failures


_warned: set[str] = set()  # prompts already named as too long in this process (eval renders per checkpoint)


def _warn_truncated(pipe: Any, family: Family, req: Request) -> None:
    """Warn, once per prompt, about a prompt longer than a text encoder reads (CLIP: 77 tokens): the pipeline
    cuts the rest off without a word. Training's own rule for captions (``sdtune.tokens.truncated_captions``)."""

    family = families.with_prompt_length(family, req.settings.max_sequence_length, "--max-sequence-length")
    prompts = [p for p in dict.fromkeys(c.prompt for c in req.cells) if p not in _warned]
    tokenizers = [getattr(pipe, spec.tokenizer_name) for spec in family.text_encoders]
    for line in truncated_captions(family, [(f"prompt '{p[:40]}'", p, None) for p in prompts], tokenizers):
        logger.warning(line.replace("its caption is", "it is"))
    _warned.update(prompts)


def _render_all(req: Request, pipe: Any, family: Family | None, known: dict[Cell, Image.Image],
                folder: CellFolder | None, inputs: tuple[Image.Image | None, Image.Image | None],
                progress: bool) -> tuple[dict[Cell, Image.Image], list[str]]:
    """Every cell's image, checkpoint by checkpoint: the ``known`` ones (given or reused) as they are, the
    others rendered, each written to ``folder`` (if any) as soon as it is there. Returns (images, one line per
    failed cell)."""
    images: dict[Cell, Image.Image] = {}
    failures: list[str] = []
    position = {c: i for i, c in enumerate(req.cells)}
    batch_seeds: dict[Cell, list[int]] = {}  # filled by render_cells before each batch renders

    def finished(cell: Cell, image: Image.Image, error: str | None) -> None:
        images[cell] = image
        if error:
            failures.append(f"cell {position[cell]} ({cell.prompt!r}, seed {cell.seed}): {error}")
        elif folder is not None and cell not in folder.written:
            folder.write(cell, image, batch_seeds.get(cell))

    for label, lora_file in req.lora or [(None, None)]:
        cells = [c for c in req.cells if c.checkpoint == label]
        for c in cells:
            if c in known:
                finished(c, known[c], None)
        todo = [c for c in cells if c not in known]
        if not todo:
            continue
        embeddings = _apply_lora(pipe, lora_file, family) if lora_file else None  # type: ignore[arg-type]
        render_cells(pipe, todo, req.settings, init_image=inputs[0], mask=inputs[1], progress=progress,
                     adapter=ADAPTER if lora_file else None, batch_seeds=batch_seeds,
                     rewrite=embeddings.rewrite if embeddings else None,
                     on_cell=finished)
        if embeddings is not None:
            embeddings.uninstall()
        if lora_file:
            pipe.unload_lora_weights()
    return images, failures


def request_from_sidecar(path: str | Path) -> Request:
    """The one-cell request that renders a saved cell again (refused when its LoRA file has changed since)."""
    try:
        d = json.loads(Path(path).read_text())
        _check_replay_lora(d, path)
        cell = Cell(**d["cell"])
        # the cell's whole batch, in its order (sidecars before batch_seeds existed: the cell alone)
        batch = [replace(cell, seed=int(seed)) for seed in d.get("batch_seeds") or [cell.seed]]
        if cell not in batch:
            batch = [cell]
        return Request(
            model=d["model"], lora=[(cell.checkpoint, d["lora"])] if d["lora"] else [], cells=batch, target=cell,
            settings=Settings(**d["settings"]), revision=d["revision"], variant=d["variant"], dtype=d["dtype"],
            device=d["device"], init_image=d["init_image"], mask=d["mask"],
            outpaint=tuple(d["outpaint"]) if d["outpaint"] else None,  # type: ignore[arg-type]
            model_options=d.get("model_options") or {},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SdtuneError(f"--replay: {path} is not an sdtune cell sidecar ({type(e).__name__}: {e})") from None


def _check_replay_lora(d: dict, path: str | Path) -> None:
    """Refuse to replay a cell whose LoRA file, or the pivotal-tuning embedding files sample reads with it, have
    changed since it was rendered (a resumed run rewrites both): the replay would draw other pixels without a
    word. (A sidecar from before ``embeddings_sha256`` was recorded is checked for its LoRA only.)"""
    lora, recorded = d.get("lora"), d.get("lora_sha256")
    if not lora or not recorded:
        return
    if not Path(lora).exists():
        raise SdtuneError(f"--replay: {path} was rendered with {lora}, which is gone")
    fix = "a replay would not give its pixels. fix: render a new grid (sdtune sample RUN)"
    now = lora_digest(lora)
    if now != recorded:
        raise SdtuneError(f"--replay: {lora} has changed since {Path(path).name} was rendered (sha256 {recorded[:12]}, "
                          f"now {now[:12]}): {fix}")
    if "embeddings_sha256" not in d:
        return
    was, now = d["embeddings_sha256"], embeddings_digest(lora)
    if now != was:
        raise SdtuneError(f"--replay: the token embeddings read with {lora} ({embeddings_folder(lora)}) have changed "
                          f"since {Path(path).name} was rendered (sha256 {(was or 'none')[:12]}, now "
                          f"{(now or 'none')[:12]}): {fix}")
