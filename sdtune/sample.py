"""Labelled sample grids: prompts x seeds x LoRA scale x guidance x checkpoint, with a JSON sidecar per cell.

Each cell is rendered with its own CPU generator seeded with its seed, so it is the same whatever else is in
the grid, and the global random state is never touched. The sidecar holds every parameter of the cell, and
``sdtune sample --replay CELL.json`` renders the same pixels again on the same machine.

Modes, all with the LoRA applied: text-to-image, image-to-image (``init_image`` + ``strength``), inpainting
(``mask``: white = repaint), outpainting (extend the canvas, inpaint the new border) and depth-to-image when
the base model is a depth model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from sdtune.checkpoint import sha256_file
from sdtune.errors import SdtuneError

SCHEDULERS = ("dpmpp_2m", "ddim", "euler", "euler_a")
ADAPTER = "sdtune"  # adapter name under which `sdtune sample` loads a LoRA


def sampling_scheduler(config: Any, name: str = "dpmpp_2m"):
    """A sampling scheduler built from the model's scheduler config (betas, prediction type)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "dpmpp_2m": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
    }
    if name not in classes:
        raise SdtuneError(f"--scheduler: unknown '{name}'; choose one of {', '.join(SCHEDULERS)}")
    # A training (DDPM) config may say clip_sample=True, which sampling schedulers must not inherit.
    return classes[name].from_config({**dict(config), "clip_sample": False})


# --------------------------------------------------------------------------------------------------------
# Cells and grids


@dataclass(frozen=True)
class Cell:
    """Everything that can differ between two images of one grid."""

    prompt: str
    seed: int
    guidance_scale: float = 7.5
    lora_scale: float | None = None  # None: leave the adapters as they are (training-time samples)
    checkpoint: str | None = None  # label of the LoRA file, for --checkpoints all


@dataclass(frozen=True)
class Settings:
    """What all cells of a grid share."""

    negative_prompt: str = ""
    steps: int = 25
    width: int = 512
    height: int = 512
    scheduler: str = "dpmpp_2m"
    mode: str = "txt2img"  # txt2img | img2img | inpaint | outpaint | depth
    strength: float = 0.75
    batch_size: int = 1


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    title: str | None = None,
    min_cell: int = 128,
) -> Image.Image:
    """Paste ``images[row][col]`` into one picture with a header row and a label column.

    Cells smaller than ``min_cell`` px are enlarged (nearest neighbour) so a person can see them."""
    zoom = max(1, -(-min_cell // max(images[0][0].width, images[0][0].height)))
    if zoom > 1:
        images = [[im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST) for im in row]
                  for row in images]
    h, w = images[0][0].height, images[0][0].width
    size = max(12, min(24, w // 12))
    font = _font(size)
    label_w = max(160, w)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header_h = size * 2 + (size + 6 if title else 0)
    grid = Image.new("RGB", (label_w + w * len(col_labels), header_h + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), title[: grid.width // max(1, size // 2)], fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * w + 4, header_h - size - 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = header_h + r * h + 4
        for line in _wrap(probe, label, font, label_w - 8)[: max(1, h // (size + 2))]:
            draw.text((4, y), line, fill="black", font=font)
            y += size + 2
        for c, im in enumerate(images[r]):
            grid.paste(im.resize((w, h)) if im.size != (w, h) else im, (label_w + c * w, header_h + r * h))
    return grid


def _failed_cell(width: int, height: int, reason: str) -> Image.Image:
    im = Image.new("RGB", (width, height), (90, 90, 90))
    draw = ImageDraw.Draw(im)
    font = _font(max(10, width // 16))
    y = 4
    for line in _wrap(draw, f"failed: {reason}", font, width - 8)[:8]:
        draw.text((4, y), line, fill="white", font=font)
        y += max(10, width // 16) + 2
    return im


def row_label(cell: Cell, varying: set[str]) -> str:
    """The prompt, plus whichever of checkpoint / LoRA scale / guidance varies in this grid."""
    parts = [cell.prompt]
    if "checkpoint" in varying:
        parts.append(str(cell.checkpoint))
    if "lora_scale" in varying or (cell.lora_scale is not None and cell.lora_scale != 1):
        parts.append(f"LoRA x{cell.lora_scale:g}")
    if "guidance_scale" in varying:
        parts.append(f"cfg {cell.guidance_scale:g}")
    return " | ".join(parts)


def layout(cells: list[Cell], images: list[Image.Image], title: str | None = None) -> Image.Image:
    """One row per (checkpoint, prompt, LoRA scale, guidance), one column per seed."""
    row_keys = list(dict.fromkeys(replace(c, seed=0) for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    varying = {f for f in ("checkpoint", "lora_scale", "guidance_scale") if len({getattr(c, f) for c in cells}) > 1}
    by_cell = dict(zip(cells, images))
    rows = [[by_cell[replace(key, seed=s)] for s in seeds] for key in row_keys]
    return make_grid(rows, [row_label(k, varying) for k in row_keys], [f"seed {s}" for s in seeds], title=title)


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
) -> tuple[list[Image.Image], list[str | None]]:
    """Render every cell (batched over seeds). A failing batch becomes grey cells with the reason;
    the other cells are kept. Returns (images, errors) in cell order; fills ``batch_seeds`` (if given) with
    the seeds each cell was rendered together with, in batch order (a replay must batch them the same way:
    batched kernels may round differently)."""
    from tqdm.auto import tqdm

    images: dict[Cell, Image.Image] = {}
    errors: dict[Cell, str] = {}
    groups: dict[Cell, list[Cell]] = {}
    for c in cells:
        groups.setdefault(replace(c, seed=0), []).append(c)
    bar = tqdm(total=len(cells), desc="sample", unit="img", disable=not progress)
    extra = _mode_inputs(settings, init_image, mask)
    for key, members in groups.items():
        if adapter is not None and key.lora_scale is not None:
            pipe.set_adapters([adapter], adapter_weights=[key.lora_scale])
        for start in range(0, len(members), settings.batch_size):
            batch = members[start : start + settings.batch_size]
            if batch_seeds is not None:
                batch_seeds.update({c: [m.seed for m in batch] for c in batch})
            try:
                out = pipe(
                    prompt=[key.prompt] * len(batch),
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
                    errors[c] = str(e).splitlines()[0][:200]
            bar.update(len(batch))
    bar.close()
    size = (settings.width, settings.height) if init_image is None else init_image.size
    out_images = [images.get(c) or _failed_cell(*size, errors[c]) for c in cells]
    return out_images, [errors.get(c) for c in cells]


def render_grid(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    settings: Settings,
    *,
    guidance_scale: float = 7.5,
    title: str | None = None,
) -> Image.Image:
    """Prompts x seeds with the pipeline's adapters as they are (used for samples during training)."""
    cells = [Cell(p, s, guidance_scale=guidance_scale) for p in prompts for s in seeds]
    images, _ = render_cells(pipe, cells, settings)
    return layout(cells, images, title=title)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save atomically (temporary name, then rename), so a crash never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------
# Input images


def read_image(path: str | Path, key: str) -> Image.Image:
    """An RGB, EXIF-upright copy of an input image, or one clear error naming the option."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{key}: cannot read {path} ({type(e).__name__}: {str(e)[:120]})") from None


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
    target: Cell | None = None  # a replay: the one cell to write (``cells`` holds its whole batch)


def _load_pipeline(req: Request):
    """The base pipeline for the request's mode, on its device and dtype (one copy of every weight)."""
    from sdtune.models import build_pipeline, inspect_model, load_components

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[req.dtype]
    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if req.settings.mode == "depth":
        from diffusers import StableDiffusionDepth2ImgPipeline

        from sdtune.models import read_model_file

        if "depth_estimator" not in read_model_file(req.model, "model_index.json", req.revision):
            raise SdtuneError(f"--depth: {req.model} is not a depth-to-image model (it has no depth_estimator); "
                              "use e.g. stabilityai/stable-diffusion-2-depth")

        try:
            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
                req.model, revision=req.revision, variant=req.variant, use_safetensors=True
            )
        except (OSError, ValueError, TypeError) as e:
            raise SdtuneError(f"--depth: {req.model} is not a depth-to-image model ({str(e).splitlines()[0][:120]})"
                              ) from None
        family = "sd2"
    else:
        info = inspect_model(req.model, req.revision, for_training=False)
        family = info.family
        components = load_components(info.pretrained, info.family, req.revision, req.variant)
        pipe = build_pipeline(components, info.family)
        if req.settings.mode == "img2img":
            from diffusers import AutoPipelineForImage2Image

            pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        elif req.settings.mode in ("inpaint", "outpaint"):
            from diffusers import AutoPipelineForInpainting

            pipe = AutoPipelineForInpainting.from_pipe(pipe)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, req.settings.scheduler)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


def lora_family(path: str | Path) -> str | None:
    """'sdxl' if a LoRA file carries a second text encoder or SDXL's kohya prefixes, else None (unknown)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
    if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys) or "sdxl" in meta.get(
        "ss_base_model_version", ""
    ):
        return "sdxl"
    return None


def _apply_lora(pipe: Any, path: str, family: str) -> None:
    if lora_family(path) == "sdxl" and family != "sdxl":
        raise SdtuneError(f"{path}: an SDXL LoRA cannot be applied to this {family} model; use --model with an SDXL model")
    try:
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=ADAPTER)
    except Exception as e:  # diffusers raises many types for a LoRA of another layout or rank
        raise SdtuneError(f"{path}: does not fit the base model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                          ) from None
    loaded = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    if not loaded:
        raise SdtuneError(f"{path}: none of its keys match this model's UNet (another family or format?)")


def run_sample(req: Request, out: Path, progress: bool = True, grid: bool = True) -> tuple[Path, list[str]]:
    """Render the request's grid to ``out`` and each cell (+ JSON sidecar) to ``<out stem>_cells/``;
    with ``grid=False`` (a replay) just the first cell's image to ``out``.
    Returns (path written, one line per failed cell)."""
    from sdtune import __version__

    init_image = read_image(req.init_image, "--init-image") if req.init_image else None
    mask = read_image(req.mask, "--mask").convert("L") if req.mask else None
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

    # Sidecars must replay from anywhere: absolute paths for everything local.
    def absolute(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    req = replace(req, model=absolute(req.model), init_image=absolute(req.init_image), mask=absolute(req.mask),
                  lora=[(label, absolute(f)) for label, f in req.lora],
                  device=req.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe, family = _load_pipeline(req)
    cells_dir = out.with_name(out.stem + "_cells") if grid else None
    images: dict[Cell, Image.Image] = {}
    failures: list[str] = []
    position = {c: i for i, c in enumerate(req.cells)}
    for label, lora_file in req.lora or [(None, None)]:
        cells = [c for c in req.cells if c.checkpoint == label]
        lora_sha256 = sha256_file(lora_file) if lora_file else None  # once per file, not once per cell
        if lora_file:
            _apply_lora(pipe, lora_file, family)
        batch_seeds: dict[Cell, list[int]] = {}
        rendered, errors = render_cells(pipe, cells, req.settings, init_image=init_image, mask=mask,
                                        progress=progress, adapter=ADAPTER if lora_file else None,
                                        batch_seeds=batch_seeds)
        if lora_file:
            pipe.unload_lora_weights()
        for c, im, err in zip(cells, rendered, errors):
            images[c] = im
            i = position[c]
            if err:
                failures.append(f"cell {i} ({c.prompt!r}, seed {c.seed}): {err}")
                continue
            if cells_dir is None:
                continue
            sidecar = {
                "sdtune_version": __version__, "model": req.model, "revision": req.revision, "variant": req.variant,
                "lora": lora_file, "lora_sha256": lora_sha256,
                "cell": asdict(c), "settings": asdict(req.settings), "dtype": req.dtype, "device": req.device,
                "init_image": req.init_image, "mask": req.mask, "outpaint": req.outpaint,
                "batch_seeds": batch_seeds.get(c, [c.seed]),
            }
            save_image(im, cells_dir / f"cell-{i:04d}.png")
            (cells_dir / f"cell-{i:04d}.json").write_text(json.dumps(sidecar, indent=2))
    if not grid:
        return save_image(images[req.target or req.cells[0]], out), failures
    title = f"{Path(req.lora[0][1]).name if req.lora else 'base model'} on {req.model}"
    picture = layout(req.cells, [images[c] for c in req.cells], title=title)
    return save_image(picture, out), failures


def request_from_sidecar(path: str | Path) -> Request:
    """The one-cell request that renders a saved cell again."""
    try:
        d = json.loads(Path(path).read_text())
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
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SdtuneError(f"--replay: {path} is not an sdtune cell sidecar ({type(e).__name__}: {e})") from None
