"""`sdtune doctor`: an environment report for bug reports and broken installs.

`collect()` runs every check and returns them as `Check` records; `report()` renders them as an aligned
report with a process exit code, and `run_doctor()` prints that report. Each check is isolated: one that
raises becomes a "problem" line instead of a traceback, so the report is always complete enough to paste
into an issue.

Package versions are checked against the requirements of the installed `sdtune` distribution (its metadata,
written from pyproject.toml at install), whole specifier sets included, so the report cannot drift from
what sdtune declares.

Only the standard library is imported at module level; torch, bitsandbytes, huggingface_hub, accelerate and
packaging (not a direct requirement of sdtune, it comes with its dependencies) are imported inside the checks
that need them, so `import sdtune.doctor` stays cheap and works even when one of those packages is broken.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sdtune.files import cache_root, existing_ancestor

if TYPE_CHECKING:
    from packaging.requirements import Requirement
    from packaging.version import Version

__all__ = ["Check", "Status", "collect", "report"]

Status = Literal["ok", "warn", "problem", "info"]

# Why sdtune pins a package, shown in the fix when the installed version is outside the pin. The metadata
# keeps pyproject.toml's specifiers but not its comments, so the reasons live here, keyed by package name.
_PIN_REASONS: dict[str, str] = {
    "transformers": "transformers 5.24 needs peft>=0.22 for text-encoder adapters, which is not released yet",
    "opencv-python-headless": "opencv 5 no longer ships the Haar face cascades that `sdtune prep` uses",
}
# Below its minimum, a package of the training stack breaks training (APIs sdtune calls are missing): a
# problem. Any other package below its minimum is a warning: sdtune is tested from there, older may work.
_TRAINING_STACK = frozenset({"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"})
# Reported for bug reports although sdtune does not require them directly (diffusers/transformers pin them).
_INDIRECT = ("huggingface_hub",)
# torch.load(weights_only=True) had unpickling bypasses before 2.6, so it is not a safety boundary there.
# A fact about torch rather than a copy of pyproject's pin: it holds even without sdtune's metadata.
_SAFE_TORCH = "2.6"

_MIN_PYTHON = (3, 10)
_LOW_DISK_GIB = 10.0
_GIB = 1024**3
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Environment variables that may hold a Hugging Face token; their values are scrubbed from the report.
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class Check:
    """One line of the doctor report.

    `status` is "ok" (fine), "info" (neutral fact), "warn" (works but worth knowing) or "problem" (likely to
    break training). `fix` is a one-line suggestion, set for warnings and problems.
    """

    name: str
    value: str
    status: Status
    fix: str | None = None


# --------------------------------------------------------------------------------------------- helpers


def _parse_version(text: str) -> Version | None:
    """`text` as a PEP 440 version ("2.6.0+cu124" included), or None if it is not one."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return None


def _installed(name: str) -> str | None:
    """The installed version of distribution `name` from its metadata (nothing imported), None if absent."""
    try:
        # Looked up through the module attribute (not a from-import) so tests can monkeypatch it.
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirements() -> list[Requirement] | None:
    """The requirements of the installed `sdtune` distribution that apply here, None if it is not installed.

    Markers are evaluated against this interpreter, so extras (`extra == "dev"`) and requirements for other
    platforms drop out.
    """
    from packaging.requirements import Requirement

    try:
        lines = importlib.metadata.requires("sdtune") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    requirements = [Requirement(line) for line in lines]
    return [req for req in requirements if req.marker is None or req.marker.evaluate()]


def _same_name(a: str, b: str) -> bool:
    """Whether two distribution names are the same package ("PyYAML" / "pyyaml", "a_b" / "a-b")."""
    from packaging.utils import canonicalize_name

    return canonicalize_name(a) == canonicalize_name(b)


def _out_of_range(req: Requirement, version: Version) -> tuple[Status, str, str]:
    """Status, short note and fix for a `version` outside `req`'s specifier set.

    Above an upper pin is a problem (pins mark known breakage); below a minimum is a problem for the training
    stack and a warning otherwise; anything else outside the set (==, ~=, !=) is a warning.
    """
    failed = [spec for spec in req.specifier if not spec.contains(version, prereleases=True)]
    pin = f"'{req.name}{req.specifier}'"
    reason = _PIN_REASONS.get(req.name)
    if any(spec.operator in ("<", "<=") for spec in failed):
        why = reason or f"sdtune pins {req.name}{req.specifier} because newer releases break it"
        return "problem", f"too new; sdtune needs {req.specifier}", f"{why}; pip install {pin}"
    if any(spec.operator in (">", ">=") for spec in failed):
        status: Status = "problem" if req.name in _TRAINING_STACK else "warn"
        why = reason or f"sdtune {'needs' if status == 'problem' else 'is tested with'} {req.name}{req.specifier}"
        return status, f"too old; sdtune needs {req.specifier}", f"{why}; pip install -U {pin}"
    return "warn", f"outside {req.specifier}", f"pip install {pin}"


def _one_line(exc: BaseException) -> str:
    """Format an exception as `Type: first line of message`, short enough for one report line."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _guard(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run one check function; turn any exception into a single "problem" line named `name`."""
    try:
        return check()
    except Exception as exc:  # the whole point is that no check can crash the report
        return [
            Check(
                name,
                f"check failed: {_one_line(exc)}",
                "problem",
                "this check itself crashed; please include this report in a bug report",
            )
        ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python-level chatter (warnings, log records, prints) from third-party code during a check.

    bitsandbytes in particular logs about optional CPU kernels on import, which would interleave with the
    report. C-level output is not captured; that is rare and harmless.
    """
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "accelerate", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    sink = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- checks


def _check_python() -> list[Check]:
    """Python version and interpreter path."""
    version = platform.python_version()
    value = f"{version} ({platform.python_implementation()}, {sys.executable})"
    if sys.version_info[:2] < _MIN_PYTHON:
        wanted = ".".join(map(str, _MIN_PYTHON))
        return [Check("python", value, "problem", f"sdtune needs Python >= {wanted}; create a newer venv")]
    return [Check("python", value, "ok")]


def _check_platform() -> list[Check]:
    """Operating system and CPU architecture."""
    return [Check("platform", f"{platform.platform()} ({platform.machine()})", "info")]


def _torch_build(torch: object) -> str:
    """Describe which accelerator backend this torch wheel was built for."""
    version = getattr(torch, "version", None)
    cuda = getattr(version, "cuda", None)
    hip = getattr(version, "hip", None)
    if cuda:
        return f"CUDA {cuda} build"
    if hip:
        return f"ROCm {hip} build"
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and mps.is_built():
        return "MPS build"
    return "CPU-only build"


def _check_torch() -> list[Check]:
    """torch version, build kind, sdtune's torch requirement and the safety rule for checkpoint loading."""
    req = next((r for r in _requirements() or [] if _same_name(r.name, "torch")), None)
    spec = str(req.specifier) if req else f">={_SAFE_TORCH}"
    version = _installed("torch")
    if version is None:
        return [Check("torch", "not installed", "problem", f"pip install 'torch{spec}'")]
    import torch

    build = _torch_build(torch)
    value = f"{version} ({build})"
    parsed = _parse_version(version)
    # An unreadable version is a problem too: there is no telling whether weights_only is safe in it.
    if parsed is None or parsed < _parse_version(_SAFE_TORCH):
        fix = f"older torch runs pickles even with weights_only; pip install -U 'torch{spec}'"
        return [Check("torch", value, "problem", fix)]
    if req is not None and not req.specifier.contains(parsed, prereleases=True):
        status, note, fix = _out_of_range(req, parsed)
        return [Check("torch", f"{version} ({build}; {note})", status, fix)]
    return [Check("torch", value, "ok")]


def _check_requirement(req: Requirement) -> Check:
    """One requirement of sdtune: installed, and inside its whole specifier set (upper pins included)."""
    version = _installed(req.name)
    if version is None:
        return Check(req.name, "not installed", "problem", f"pip install '{req.name}{req.specifier}'")
    parsed = _parse_version(version)
    if parsed is None:
        fix = f"pip install -U '{req.name}{req.specifier}'"
        return Check(req.name, f"{version} (not a PEP 440 version; cannot check {req.specifier})", "warn", fix)
    if req.specifier.contains(parsed, prereleases=True):
        return Check(req.name, version, "ok")
    status, note, fix = _out_of_range(req, parsed)
    return Check(req.name, f"{version} ({note})", status, fix)


def _check_packages() -> list[Check]:
    """Every requirement of the installed sdtune against its installed version, read from metadata without
    importing anything; then the indirect packages a bug report needs (info)."""
    requirements = _requirements()
    checks: list[Check] = []
    if requirements is None:
        value = "sdtune's package metadata not found (run from a source tree?); versions not checked"
        checks.append(Check("packages", value, "warn", "install it: pip install -e . in the source tree"))
    else:
        # torch has its own line, with the build kind and the weights_only rule.
        checks.extend(_check_requirement(req) for req in requirements if not _same_name(req.name, "torch"))
    for name in _INDIRECT:
        if any(_same_name(req.name, name) for req in requirements or []):
            continue  # already checked as a direct requirement
        version = _installed(name)
        if version is None:
            checks.append(Check(name, "not installed", "problem", f"pip install {name}"))
        else:
            checks.append(Check(name, version, "info"))
    return checks


def _check_peft_for_transformers() -> list[Check]:
    """transformers' text-encoder adapters need a minimum peft; a newer transformers than peft supports
    breaks text-encoder LoRA (training and diffusers' load_lora_weights) with an unhelpful message."""
    from transformers.integrations import peft as tf_peft

    needed = getattr(tf_peft, "MIN_PEFT_VERSION", None)
    have = importlib.metadata.version("peft")
    have_version = _parse_version(have)
    if needed and (have_version is None or have_version < _parse_version(str(needed))):
        tf = importlib.metadata.version("transformers")
        fix = f"pip install 'peft>={needed}', or if that is not released yet: pip install 'transformers<{tf}'"
        return [Check("peft/transformers", f"transformers {tf} needs peft>={needed}, have {have}", "problem", fix)]
    return [Check("peft/transformers", f"compatible (transformers needs peft>={needed})", "ok")]


def _check_adamw8bit() -> list[Check]:
    """Whether bitsandbytes' 8-bit AdamW really runs here: build it and take one optimizer step.

    Importing bitsandbytes succeeds on many machines where its kernels then fail (missing CUDA libs, wrong
    architecture), so only an actual step is trustworthy. 4096 elements is bitsandbytes' default
    `min_8bit_size`; smaller tensors silently fall back to 32-bit state and would test nothing.
    """
    name = "8-bit AdamW"
    fallback = "use train.optimizer=adamw"
    try:
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return [Check(name, "unavailable (bitsandbytes not installed)", "problem", fallback)]

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with _quiet():
            import bitsandbytes as bnb

            param = torch.nn.Parameter(torch.ones(4096, device=device))
            optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
            param.grad = torch.full_like(param, 0.5)
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            state = optimizer.state[param]
            moved = bool(torch.isfinite(param).all()) and bool((param != 1).any())
    except Exception as exc:  # any failure here means "don't use the 8-bit optimizer"
        return [Check(name, f"fails on {device}: {_one_line(exc)}", "problem", fallback)]

    if not moved:
        return [Check(name, f"step on {device} did not update the parameter", "problem", fallback)]
    state1 = state.get("state1")
    if state1 is None or state1.dtype != torch.uint8:
        # The step ran, but with 32-bit state: no memory saving, which is the only reason to pick it.
        detail = "no state" if state1 is None else str(state1.dtype)
        return [Check(name, f"runs on {device} but keeps {detail} state, not 8-bit", "warn", fallback)]
    return [Check(name, f"works on {device} (one step, 8-bit state)", "ok")]


def _check_gpus() -> list[Check]:
    """Every visible CUDA/ROCm device with memory, compute capability and mixed-precision support."""
    import torch

    if not torch.cuda.is_available():
        value = "none (training will be slow on CPU)"
        if torch.version.cuda or torch.version.hip:
            # A GPU build with no visible device is usually a driver problem or CUDA_VISIBLE_DEVICES="".
            value = "none visible to this GPU build of torch; check nvidia-smi (training will be slow on CPU)"
        return [Check("gpu", value, "info")]

    checks: list[Check] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        with torch.cuda.device(index):
            try:
                # Native bf16 only; emulated bf16 (e.g. on Turing) is slower than fp16 and misleading here.
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch without the including_emulation argument
                bf16 = torch.cuda.is_bf16_supported()
        # Native fp16 arithmetic arrived with compute capability 5.3; ROCm devices all have it.
        fp16 = bool(torch.version.hip) or capability >= (5, 3)
        value = (
            f"{props.name}, {props.total_memory / _GIB:.1f} GiB, compute {props.major}.{props.minor}, "
            f"bf16 {'yes' if bf16 else 'no'}, fp16 {'yes' if fp16 else 'no'}"
        )
        checks.append(Check(f"gpu {index}", value, "ok"))
    return checks


def _check_mps() -> list[Check]:
    """Apple-silicon Metal backend availability."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        return [Check("mps", "not built into this torch", "info")]
    if mps.is_available():
        return [Check("mps", "available", "ok")]
    return [Check("mps", "built but not available (needs macOS 12.3+ on Apple silicon)", "info")]


def _disk_check(name: str, folder: Path) -> Check:
    """Free space on the filesystem that holds (or will hold) `folder`."""
    target = existing_ancestor(folder)  # caches and output dirs may not exist yet
    free_gib = shutil.disk_usage(target).free / _GIB
    where = (
        str(folder) if target == folder.expanduser().absolute() else f"{folder} (not created yet; {target})"
    )
    value = f"{free_gib:.1f} GiB free at {where}"
    if free_gib < _LOW_DISK_GIB:
        fix = f"free space or move it; model downloads and checkpoints need >= {_LOW_DISK_GIB:g} GiB"
        return Check(name, value, "warn", fix)
    return Check(name, value, "ok")


def _hf_hub_cache() -> Path:
    """The Hugging Face hub download cache (honours $HF_HUB_CACHE / $HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _check_disk(output_dir: Path) -> list[Check]:
    """Free space where runs, Hugging Face downloads and sdtune's own cache are written."""
    # Guarded one by one so an unreadable cache location doesn't hide the output dir's numbers.
    folders: list[tuple[str, Callable[[], Path]]] = [
        ("disk (output)", lambda: output_dir),
        ("disk (hf cache)", _hf_hub_cache),
        ("disk (sdtune)", cache_root),
    ]
    checks: list[Check] = []
    for name, folder in folders:
        checks.extend(_guard(name, lambda name=name, folder=folder: [_disk_check(name, folder())]))
    return checks


def _check_offline() -> list[Check]:
    """Offline switches for the Hub, transformers and datasets, and the wandb mode."""
    offline = ", ".join(f"{var}={os.environ.get(var, 'unset')}" for var in _OFFLINE_VARS)
    return [
        Check("offline", offline, "info"),
        Check("wandb mode", os.environ.get("WANDB_MODE", "unset"), "info"),
    ]


def _check_hf_token() -> list[Check]:
    """Whether a Hugging Face token is configured. Only "set"/"not set" is reported, never the token."""
    from huggingface_hub import get_token

    with _quiet():
        configured = get_token() is not None
    return [Check("hf token", "set" if configured else "not set", "info")]


def _accelerate_default_config() -> Path:
    """Path `accelerate launch` reads when given no --config_file."""
    try:
        from accelerate.commands.config.config_args import default_config_file

        return Path(default_config_file)
    except ImportError:
        # Same rule as accelerate 1.x:
        # $HF_HOME (else $XDG_CACHE_HOME/huggingface)/accelerate/default_config.yaml
        cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
        hf_home = os.path.expanduser(os.environ.get("HF_HOME", os.path.join(cache, "huggingface")))
        return Path(hf_home) / "accelerate" / "default_config.yaml"


def _check_accelerate_config(path: Path | None = None) -> list[Check]:
    """Accelerate's default config file and the three settings that change how training launches."""
    name = "accelerate cfg"
    if path is None:
        with _quiet():
            path = _accelerate_default_config()
    if not path.is_file():
        return [Check(name, f"not configured (defaults: single process); {path} absent", "info")]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
        if not isinstance(config, dict):
            raise ValueError("top level is not a mapping")
    except Exception as exc:  # a broken file is a finding, not a crash
        fix = f"run `accelerate config` again or delete {path}"
        return [Check(name, f"{path} unreadable: {_one_line(exc)}", "problem", fix)]
    settings = ", ".join(
        f"{key}={config.get(key, 'unset')}"
        for key in ("distributed_type", "num_processes", "mixed_precision")
    )
    fsdp = config.get("fsdp_config") if isinstance(config.get("fsdp_config"), dict) else {}
    if config.get("distributed_type") == "FSDP" and str(fsdp.get("fsdp_version", 1)) != "2":
        # sdtune.fsdp: FSDP1 flattens a block's bf16 weights and fp32 LoRA into one tensor, which torch refuses
        return [Check(name, f"{path}: {settings}, fsdp_version={fsdp.get('fsdp_version', '1 (unset)')}", "problem",
                      "sdtune trains under FSDP2 only: set fsdp_config.fsdp_version: 2 (recipes/accelerate/fsdp.yaml)")]
    return [Check(name, f"{path}: {settings}", "info")]


# ------------------------------------------------------------------------------------------ public API


def collect(output_dir: str | os.PathLike[str] | None = None) -> list[Check]:
    """Run every environment check and return the results in report order.

    `output_dir` is where training output will go (default: the current directory); only its free disk space
    is inspected. Never raises for a failing check: each failure is returned as a "problem" Check.
    """
    out = Path(output_dir) if output_dir is not None else Path.cwd()
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", _check_python),
        ("platform", _check_platform),
        ("torch", _check_torch),
        ("packages", _check_packages),
        ("peft/transformers", _check_peft_for_transformers),
        ("8-bit AdamW", _check_adamw8bit),
        ("gpu", _check_gpus),
        ("mps", _check_mps),
        ("disk", lambda: _check_disk(out)),
        ("offline", _check_offline),
        ("hf token", _check_hf_token),
        ("accelerate cfg", _check_accelerate_config),
    ]
    checks: list[Check] = []
    for name, step in steps:
        checks.extend(_guard(name, step))
    return checks


def _secrets() -> list[str]:
    """Token values that must never appear in the printed report, however a check got hold of them."""
    values = [os.environ.get(var, "") for var in _TOKEN_VARS]
    with contextlib.suppress(Exception), _quiet():
        from huggingface_hub import get_token

        values.append(get_token() or "")
    # Very short strings would redact ordinary words; real tokens are long.
    return [value for value in values if len(value) >= 8]


def _format(checks: list[Check]) -> str:
    """Render checks as aligned `name  value` lines, with a `-> fix:` line under warnings and problems."""
    width = max((len(check.name) for check in checks), default=0) + 2
    lines = ["sdtune doctor"]
    for check in checks:
        tag = {"warn": "  [warning]", "problem": "  [PROBLEM]"}.get(check.status, "")
        lines.append(f"  {check.name:<{width}}{check.value}{tag}")
        if check.fix and check.status in ("warn", "problem"):
            lines.append(f"  {'':<{width}}-> fix: {check.fix}")
    problems = sum(check.status == "problem" for check in checks)
    warns = sum(check.status == "warn" for check in checks)
    lines.append(f"{problems} problem(s), {warns} warning(s)")
    return "\n".join(lines)


def report(output_dir: str | os.PathLike[str] | None = None) -> tuple[str, int]:
    """The environment report as text, tokens redacted, and its exit code: 0 if there is no problem (warnings
    allowed), else 1. Prints nothing; `output_dir` is as for `collect`."""
    checks = collect(output_dir)
    text = _format(checks)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text, 1 if any(check.status == "problem" for check in checks) else 0
