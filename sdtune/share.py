"""Sharing a run: its model card (Hugging Face conventions) and ``sdtune push`` to the Hub.

Nothing private leaves the machine that the user did not choose to publish: no local paths (a local base
model is named by its folder's or file's name, ``sdtune.export.public_name``), no tokens (the Hub token comes
only from the environment or ``hf auth login``). The card shows the instance prompt (each concept's); the kohya file carries,
as kohya's own files do, the tag frequencies of the captions and the data folders' names that AUTOMATIC1111
shows as its "training tags" (``sdtune.export.kohya_metadata``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from PIL import Image

from sdtune.errors import SdtuneError, first_line
from sdtune.export import existing_run_files, public_name
from sdtune.families import Family
from sdtune.files import write_text
from sdtune.hub import check_repo_id, public_model_id
from sdtune.models import TRANSFORMER_LAYOUTS, read_transformer_file
from sdtune.runs import CARD, EMBEDDINGS_DIR, WEIGHT_NAME, prompt_length, safetensors_header


def subjects(data: dict) -> list[tuple[str, str]]:
    """(identifier, a prompt that shows it) of each subject a run trained: ``data.identifier``, or each of
    ``data.concepts``, with its instance prompt (else 'a photo of IDENTIFIER')."""
    concepts = data.get("concepts") or [data]
    return [(c["identifier"], c.get("instance_prompt") or f"a photo of {c['identifier']}") for c in concepts]


def _usage(named: list[tuple[str, str]]) -> list[str]:
    """How to prompt the LoRA's subject, or each of its subjects."""
    if len(named) == 1:
        return [f"Use `{named[0][1]}` in prompts to get the subject."]
    return [f"It knows {len(named)} subjects; name one by its identifier in a prompt to get it:", "",
            *(f"- `{word}`: e.g. `{prompt}`" for word, prompt in named)]


def model_card(config: dict, family: Family, grid: str | None, kohya_name: str | None) -> str:
    """Markdown with YAML front matter: base_model, tags, instance_prompt, license, widget. A run of several
    concepts names every identifier and how to prompt each."""
    model, data, lora, train = config["model"], config["data"], config["lora"], config["train"]
    # a FLUX.1 / SD3.x transformer file beside the model that gives it encoders, tokenizers, scheduler (model.base)
    paired = public_model_id(model.get("base")) or (model.get("base") and "BASE_MODEL")
    # the hub validates base_model: a hub id or nothing (a transformer file is a file, whatever its path looks like)
    base = None if paired else public_model_id(model["pretrained"])
    named = subjects(data)
    instance_prompt = named[0][1]
    front = {
        "base_model": base,
        "library_name": "diffusers",
        # The LoRA inherits the base model's licence, which sdtune cannot read offline.
        "license": "other",
        "tags": ["text-to-image", "diffusers", "lora", "dreambooth", "sdtune", "template:sd-lora",
                 *family.hub_tags],
        # the Hub shows it as the trigger words: with several concepts, their identifiers
        "instance_prompt": instance_prompt if len(named) == 1 else ", ".join(word for word, _ in named),
        "widget": [{"text": prompt, "output": {"url": grid}} for _, prompt in named] if grid else [],
    }
    front = {k: v for k, v in front.items() if v not in (None, [])}
    # a local base by its folder's or file's name, never its path
    base_text = f"[{base}](https://huggingface.co/{base})" if base else \
        f"a local base model (`{public_name(model['pretrained'])}`)"
    if paired:
        base_text = f"the transformer file `{_file_name(model['pretrained'])}` with {paired}'s text encoders"
    usage = _usage(named)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# DreamBooth LoRA: {', '.join(f'`{word}`' for word, _ in named)}", "",
        f"A LoRA trained with [sdtune](https://pypi.org/project/sdtune/) on {base_text} ({family.label}). "
        + usage[0], *usage[1:], "",
    ]
    if grid:
        lines += [f"![samples]({grid})", ""]
    lines += [
        "## Use it in diffusers", "", "```python", "import torch",
        *_pipeline_lines(model, family, base, paired),
        "pipe.load_lora_weights('REPO_OR_FOLDER')" if lora.get("type", "lora") == "lora" else
        f"# a LyCORIS {lora['type']}: load_lora_weights cannot read it; use the kohya file or sdtune sample",
        f"image = pipe({instance_prompt + ' on the beach'!r}{_call_options(config, family)}).images[0]", "```", "",
    ]
    if kohya_name:
        lines += [
            f"## {', '.join(family.lora_clients)}", "", _kohya_usage(kohya_name, family.lora_clients), "",
        ]
    lines += _embeddings_usage(config, family, [word for word, _ in named])
    lines += [
        "## Training", "",
        "| setting | value |", "|---|---|",
        f"| rank / alpha | {lora['rank']} / {lora.get('alpha') or lora['rank']} ({lora.get('type', 'lora')}) |",
        f"| target modules | {', '.join(lora['target_modules'])} |",
        f"| text encoder | {'trained' if lora.get('train_text_encoder') else 'frozen'} |",
        f"| prior preservation | {'on' if config.get('prior', {}).get('enabled') else 'off'} |",
        f"| steps x batch | {train['max_steps']} x {train['batch_size']} |",
        f"| learning rate | {train['learning_rate']} ({train['lr_scheduler']}) |",
        f"| optimizer / precision | {train['optimizer']} / {train['mixed_precision']}"
        + _base_storage(config.get("model", {})) + " |",
        f"| resolution | {data.get('resolution') or 'native'} |", "",
    ]
    return "\n".join(lines)


def _call_options(config: dict, family: Family) -> str:
    """The pipeline call's arguments beyond the prompt: the run's own grids' settings where its config records
    them (``sample.negative_prompt``, ``steps``, ``guidance_scale``: what its samples were judged at), and a T5
    family's prompt length, the run's (``flux.`` / ``sd3.max_sequence_length``) or the model's (FLUX.1-schnell:
    256), which FluxPipeline's default of 512 is not."""
    sample = config.get("sample") or {}
    # a pipeline that ignores a negative prompt (FLUX.1) is not shown one
    negative = sample.get("negative_prompt") and not family.sampling.negative_prompt_unused
    options = [f"negative_prompt={sample['negative_prompt']!r}"] if negative else []
    options += [f"{name}={sample[key]!r}" for key, name in (("steps", "num_inference_steps"),
                                                           ("guidance_scale", "guidance_scale"))
                if sample.get(key) is not None]
    tokens = prompt_length(config) or family.max_sequence_length
    options += [f"max_sequence_length={tokens}"] if tokens else []
    return "".join(f", {option}" for option in options)


def _kohya_usage(kohya_name: str, clients: tuple[str, ...]) -> str:
    """Where the kohya file goes in each UI that loads it for this family."""
    prompt_uis = [c for c in clients if c in ("AUTOMATIC1111", "Forge")]
    where = ["`models/loras/` (ComfyUI: *Load LoRA* node)"] if "ComfyUI" in clients else []
    if prompt_uis:
        where.append(f"`models/Lora/` ({' / '.join(prompt_uis)}: `<lora:{Path(kohya_name).stem}:1>` in the prompt)")
    return f"Use `{kohya_name}` (kohya format): put it in {' or '.join(where)}."


def _file_name(path: str) -> str:
    """A file's name without its folders (either separator): a transformer file's path may look like a hub id."""
    return Path(path.replace("\\", "/")).name


def _pipeline_lines(model: dict, family: Family, base: str | None, paired: str | None) -> list[str]:
    """The diffusers snippet's imports and pipeline: ``from_pretrained`` of the base, or for a transformer file
    (``paired``: its ``model.base``) the file's transformer from ``from_single_file`` in that base's pipeline."""
    pipeline = family.lora_pipeline
    # the device and dtype chosen in the snippet, so that it runs as written with or without a GPU (fp16 / bf16
    # matmuls are a GPU's); `dtype=` is diffusers' keyword now (it deprecates `torch_dtype`, and warns)
    device = ["device = 'cuda' if torch.cuda.is_available() else 'cpu'",
              f"dtype = torch.{family.sampling.torch_dtype} if device == 'cuda' else torch.float32  # older "
              "diffusers: torch_dtype=dtype"]
    denoiser = next((layout.model_class for layout in TRANSFORMER_LAYOUTS if layout.family == family.name), None)
    if not paired or denoiser is None:
        return [f"from diffusers import {pipeline}", "", *device,
                f"pipe = {pipeline}.from_pretrained({base or 'BASE_MODEL'!r}, dtype=dtype).to(device)"]
    file = _file_name(model["pretrained"])
    return [f"from diffusers import {denoiser}, {pipeline}", "", *device,
            f"transformer = {denoiser}.from_single_file({file!r}, config={paired!r}, subfolder='transformer', "
            "dtype=dtype)",
            *_bundled_encoders_note(model, file),
            f"pipe = {pipeline}.from_pretrained({paired!r}, transformer=transformer, dtype=dtype).to(device)"]


def _bundled_encoders_note(model: dict, file: str) -> list[str]:
    """A comment in the snippet where training read text encoders from the transformer file
    (``model.bundled_text_encoders``) and the snippet, which loads the base's, would condition differently."""
    tf = read_transformer_file(model["pretrained"]) if model.get("bundled_text_encoders", True) else None
    bundled = [b.name for b in tf.text_encoders] if tf else []
    if not bundled:
        return []
    return [f"# the LoRA was trained with the text encoders {file} bundles ({', '.join(bundled)}); this loads the "
            "base's, the same only if the file's are copies of them (ComfyUI's checkpoint loader reads the file's)"]


def _base_storage(model: dict) -> str:
    """The base model's storage while training, where it was not the compute dtype (``model.quantize``,
    ``model.quantize_text_encoders``)."""
    denoiser, encoders = model.get("quantize", "none"), model.get("quantize_text_encoders", "none")
    parts = ([f"base model stored in {denoiser}"] if denoiser != "none" else []) + \
        ([f"text encoders in {encoders}"] if encoders != "none" else [])
    return f", {', '.join(parts)} (the LoRA loads on any precision)" if parts else ""


def _embeddings_usage(config: dict, family: Family, words: list[str]) -> list[str]:
    """How to load pivotal tuning's embedding files in each tool (nothing without pivotal tuning)."""
    if not (config.get("pivotal") or {}).get("enabled"):
        return []
    keys = " + ".join(f"`{spec.embedding_key}`" for spec in family.text_encoders)
    files = ", ".join(f"`embeddings/{w}.safetensors`" for w in words)
    word = words[0]
    if any(spec.model_class.startswith("T5") for spec in family.text_encoders):
        return _t5_embeddings_usage(family, files, keys, word)
    return [
        "## The trained token embeddings (pivotal tuning)", "",
        f"The identifiers were trained as new token embeddings beside the LoRA: {files} ({keys}). Use them with "
        "the LoRA, or its subject will be missing something:", "",
        "- AUTOMATIC1111 / Forge: the kohya file already carries them (`bundle_emb`); or put the files in "
        f"`embeddings/` and write `{word}` as before.",
        f"- ComfyUI: put the files in `models/embeddings/` and write `embedding:{word}` where a prompt says `{word}`.",
        f"- diffusers: `pipe.load_textual_inversion('embeddings/{word}.safetensors', token='<{word}>')`"
        + (", once per text encoder with its tensor (`text_encoder_2`, `tokenizer_2`)"
           if len(family.text_encoders) > 1 else "")
        + f", then `<{word}>` in the prompt.",
        f"- sdtune: `sdtune sample` loads them with the run's LoRA; write `{word}`.", "",
    ]


def _t5_embeddings_usage(family: Family, files: str, keys: str, word: str) -> list[str]:
    """The card's lines for a family with T5 (FLUX.1, SD3), whose vectors the UIs' embedding loaders are not
    known to read."""
    pairs = ", ".join(f"`{spec.embedding_key}` into `{spec.name}` / `{spec.tokenizer_name}`"
                      for spec in family.text_encoders)
    return [
        "## The trained token embeddings (pivotal tuning)", "",
        f"The identifiers were trained as new token embeddings beside the LoRA, in every text encoder, T5 "
        f"included: {files} ({keys}; their token names in the metadata, `sdtune.tokens`). Use them with the LoRA:", "",
        f"- sdtune: `sdtune sample` loads them with the run's LoRA; write `{word}`.",
        f"- diffusers: `pipe.load_textual_inversion(tensors[key], token=tokens, text_encoder=..., tokenizer=...)` "
        f"once per text encoder ({pairs}), then the tokens in place of `{word}`.",
        "- ComfyUI, Forge, AUTOMATIC1111: not known to read T5 vectors from an embedding file (not tested); the "
        "LoRA alone loads there.", "",
    ]


def write_model_card(run_dir: Path, config: dict, family: Family) -> Path:
    """Write ``README.md`` into the run folder, pointing at its newest sample grid and kohya file."""
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    kohya = existing_run_files(run_dir).get("kohya")
    card = model_card(
        config, family,
        grid=grids[-1].relative_to(run_dir).as_posix() if grids else None,
        kohya_name=kohya[-1].name if kohya else None,
    )
    return write_text(run_dir / CARD, card)


def files_to_push(run_dir: Path) -> list[Path]:
    """What a push uploads: card, LoRA files, the newest sample grid. Never config.yaml (it has local paths),
    checkpoints, logs or class images."""
    if not (run_dir / WEIGHT_NAME).is_file():
        raise SdtuneError(f"{run_dir}: no {WEIGHT_NAME}; push a finished run folder")
    files = [run_dir / CARD, run_dir / WEIGHT_NAME, *(f for fs in existing_run_files(run_dir).values() for f in fs),
             *sorted((run_dir / EMBEDDINGS_DIR).glob("*.safetensors"))]  # pivotal tuning's, one per identifier
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    return [f for f in files if f.is_file()] + grids[-1:]


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not fit to publish, or None: a .safetensors must open and its tensors fill the file
    exactly (not truncated), a picture must decode, a text file must be UTF-8."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            safetensors_header(path)
        elif suffix in (".png", ".jpg", ".jpeg", ".webp"):
            with Image.open(path) as im:
                im.load()  # decode every pixel: a truncated picture fails here, not on the Hub
        else:
            path.read_bytes().decode("utf-8")
    except SdtuneError as e:
        return str(e).removeprefix(f"{path} ").removeprefix(f"{path}: ").removeprefix("is ")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start})"
    except OSError as e:  # PIL's "cannot identify image file" and "image file is truncated" are OSErrors too
        return e.strerror or first_line(e, 160 + len(str(path)) + 3).replace(f" '{path}'", "")[:160]
    except (ValueError, SyntaxError) as e:  # PIL raises these for some broken files
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def verify_files(files: list[Path], run_dir: Path) -> None:
    """Refuse to publish (one ``SdtuneError`` listing every bad file) unless every file checks out."""
    bad = [(f, why) for f in files if (why := file_problem(f))]
    if bad:
        listed = "; ".join(f"{f.relative_to(run_dir).as_posix()}: {why}" for f, why in bad)
        raise SdtuneError(f"push: {len(bad)} of {len(files)} files are not fit to upload: {listed}; replace them "
                          "(training writes them; `sdtune export` writes LoRA files) and push again")


def _offline() -> str | None:
    """The variable that puts huggingface_hub in offline mode (read now, as the user set it), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def push(run_dir: Path, repo: str, public: bool = False, dry_run: bool = False) -> list[str]:
    """Upload a run to ``repo`` (private unless ``public``) as one commit; return the paths in the repo.

    Every file is verified first (``verify_files``; a dry run too), so nothing broken is published. One commit
    means a failure (offline, no token, no permission, a file gone) leaves the repo as it was, never
    half-pushed. ``dry_run`` only checks and lists the files and touches nothing.
    """
    check_repo_id(repo, "--repo")
    if not (run_dir / CARD).is_file():
        raise SdtuneError(f"{run_dir}: no {CARD} model card; it is written at the end of training")
    files = files_to_push(run_dir)
    names = [f.relative_to(run_dir).as_posix() for f in files]
    verify_files(files, run_dir)
    if dry_run:
        return names
    offline = _offline()
    if offline:
        raise SdtuneError(f"push to {repo} failed: {offline} is set, and nothing can be pushed in offline mode; "
                          f"unset {offline} (`unset {offline}`) and push again")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()  # token from HF_TOKEN or `hf auth login`, never from a flag
    try:
        # Built inside the try: CommitOperationAdd reads and hashes each file, which can fail too.
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f))
                      for f, name in zip(files, names)]
        api.create_repo(repo, private=not public, exist_ok=True, repo_type="model")
        # The message names no local folder: run folder names can be private.
        message = f"Upload LoRA with sdtune ({len(names)} files)"
        api.create_commit(repo, operations=operations, commit_message=message, repo_type="model")
    except Exception as e:  # offline, no token, no permission: one line
        # huggingface_hub read its offline switch when it was imported; logging in would not help then
        hint = ("unset HF_HUB_OFFLINE to push" if type(e).__name__ == "OfflineModeIsEnabled"
                else "log in with `hf auth login` or set HF_TOKEN")
        raise SdtuneError(f"push to {repo} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]} "
                          f"({hint})") from None
    return names
