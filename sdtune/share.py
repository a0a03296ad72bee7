"""Sharing a run: its model card (Hugging Face conventions) and ``sdtune push`` to the Hub.

Nothing private leaves the machine: no local paths, no captions beyond the instance prompt the user chose
to publish, no tokens (the Hub token comes only from the environment or ``hf auth login``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sdtune.errors import SdtuneError
from sdtune.lora import WEIGHT_NAME

CARD = "README.md"
KOHYA_SUFFIX = "_kohya.safetensors"


def _hub_id(pretrained: str) -> str | None:
    """The model id if ``pretrained`` is a hub id, None if it is a local folder (never publish paths)."""
    if Path(pretrained).expanduser().exists() or pretrained.startswith((".", "/", "~")):
        return None
    return pretrained if pretrained.count("/") == 1 else None


def model_card(config: dict, family: str, grid: str | None, kohya_name: str | None) -> str:
    """Markdown with YAML front matter: base_model, tags, instance_prompt, license, widget."""
    model, data, lora, train = config["model"], config["data"], config["lora"], config["train"]
    base = _hub_id(model["pretrained"])
    instance_prompt = data.get("instance_prompt") or f"a photo of {data['identifier']}"
    sdxl = family == "sdxl"
    front = {
        "base_model": base,
        "library_name": "diffusers",
        # The LoRA inherits the base model's licence, which sdtune cannot read offline.
        "license": "other",
        "tags": ["text-to-image", "diffusers", "lora", "dreambooth", "sdtune", "template:sd-lora",
                 "stable-diffusion-xl" if sdxl else "stable-diffusion"],
        "instance_prompt": instance_prompt,
        "widget": [{"text": instance_prompt, "output": {"url": grid}}] if grid else [],
    }
    front = {k: v for k, v in front.items() if v not in (None, [])}
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "a local base model"
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# DreamBooth LoRA: `{data['identifier']}`", "",
        f"A LoRA trained with [sdtune](https://pypi.org/project/sdtune/) on {base_text} ({family}). "
        f"Use `{instance_prompt}` in prompts to get the subject.", "",
    ]
    if grid:
        lines += [f"![samples]({grid})", ""]
    lines += [
        "## Use it in diffusers", "", "```python", "import torch",
        f"from diffusers import {pipeline}", "",
        f"pipe = {pipeline}.from_pretrained({base or 'BASE_MODEL'!r}, torch_dtype=torch.float16).to('cuda')",
        "pipe.load_lora_weights('REPO_OR_FOLDER')",
        f"image = pipe({instance_prompt + ' on the beach'!r}).images[0]", "```", "",
    ]
    if kohya_name:
        lines += [
            "## ComfyUI, AUTOMATIC1111, Forge, InvokeAI", "",
            f"Use `{kohya_name}` (kohya format): put it in `models/loras/` (ComfyUI: *Load LoRA* node) or "
            f"`models/Lora/` (AUTOMATIC1111 / Forge: `<lora:{Path(kohya_name).stem}:1>` in the prompt).", "",
        ]
    lines += [
        "## Training", "",
        "| setting | value |", "|---|---|",
        f"| rank / alpha | {lora['rank']} / {lora.get('alpha') or lora['rank']} |",
        f"| target modules | {', '.join(lora['target_modules'])} |",
        f"| text encoder | {'trained' if lora.get('train_text_encoder') else 'frozen'} |",
        f"| prior preservation | {'on' if config.get('prior', {}).get('enabled') else 'off'} |",
        f"| steps x batch | {train['max_steps']} x {train['batch_size']} |",
        f"| learning rate | {train['learning_rate']} ({train['lr_scheduler']}) |",
        f"| optimizer / precision | {train['optimizer']} / {train['mixed_precision']} |",
        f"| resolution | {data.get('resolution') or 'native'} |", "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, config: dict, family: str) -> Path:
    """Write ``README.md`` into the run folder, pointing at its newest sample grid and kohya file."""
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    kohya = sorted(run_dir.glob(f"*{KOHYA_SUFFIX}"))
    card = model_card(
        config, family,
        grid=grids[-1].relative_to(run_dir).as_posix() if grids else None,
        kohya_name=kohya[-1].name if kohya else None,
    )
    path = run_dir / CARD
    path.write_text(card, encoding="utf-8")
    return path


def files_to_push(run_dir: Path) -> list[Path]:
    """What a push uploads: card, LoRA files, the newest sample grid. Never config.yaml (it has local paths),
    checkpoints, logs or class images."""
    if not (run_dir / WEIGHT_NAME).is_file():
        raise SdtuneError(f"{run_dir}: no {WEIGHT_NAME}; push a finished run folder")
    files = [run_dir / CARD, run_dir / WEIGHT_NAME, *sorted(run_dir.glob(f"*{KOHYA_SUFFIX}"))]
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    return [f for f in files if f.is_file()] + grids[-1:]


def push(run_dir: Path, repo: str, public: bool = False, dry_run: bool = False) -> list[str]:
    """Upload a run to ``repo`` (private unless ``public``); return the uploaded paths in the repo."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SdtuneError(f"--repo: '{repo}' is not a repo id like user/my-dog-lora")
    if not (run_dir / CARD).is_file():
        raise SdtuneError(f"{run_dir}: no {CARD} model card; it is written at the end of training")
    files = files_to_push(run_dir)
    names = [f.relative_to(run_dir).as_posix() for f in files]
    if dry_run:
        return names
    from huggingface_hub import HfApi

    api = HfApi()  # token from HF_TOKEN or `hf auth login`, never from a flag
    try:
        api.create_repo(repo, private=not public, exist_ok=True, repo_type="model")
        for f, name in zip(files, names):
            api.upload_file(path_or_fileobj=str(f), path_in_repo=name, repo_id=repo, repo_type="model")
    except Exception as e:  # offline, no token, no permission: one line
        raise SdtuneError(f"push to {repo} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                          "(log in with `hf auth login` or set HF_TOKEN)") from None
    return names
