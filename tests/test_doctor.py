"""Tests for `sdtune doctor` (sdtune/doctor.py). Offline; the 8-bit AdamW check runs for real on CPU."""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sdtune import doctor
from sdtune.cli import main
from sdtune.doctor import Check, collect, report

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_secretvalue123"
STATUSES = {"ok", "warn", "problem", "info"}
DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def run_doctor(output_dir: Path) -> int:
    """`sdtune doctor --output-dir DIR`: the library reports, the CLI prints."""
    return main(["doctor", "--output-dir", str(output_dir)])


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the checks offline and away from the real user's caches and config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "sdtune-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def _fake_versions(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    """Make importlib.metadata.version report these versions (None: not installed); others stay real."""
    real_version = importlib.metadata.version

    def fake_version(name: str) -> str:
        key = name.replace("-", "_")
        if key in versions:
            if versions[key] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[key]
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)


def _pyproject_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def _line(out: str, name: str) -> str:
    """The report line whose name column is `name`."""
    for line in out.splitlines():
        if line.startswith(f"  {name} "):
            return line
    raise AssertionError(f"no report line for {name!r} in:\n{out}")


def test_run_doctor_prints_report_without_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)

    code = run_doctor(tmp_path)

    captured = capsys.readouterr()
    assert code in (0, 1)
    for name in ("python", "torch", "diffusers", "transformers", "bitsandbytes", "huggingface_hub"):
        _line(captured.out, name)
    adamw = _line(captured.out, "8-bit AdamW")
    assert "works on" in adamw or "fails on" in adamw or "not 8-bit" in adamw or "unavailable" in adamw
    assert _line(captured.out, "hf token").split()[-1] == "set"
    assert SECRET not in captured.out
    assert SECRET not in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert captured.out.rstrip().endswith("warning(s)")


def test_report_redacts_token_even_if_a_check_leaks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(doctor, "_check_platform", lambda: [Check("platform", f"oops {SECRET}", "info")])

    run_doctor(tmp_path)

    out = capsys.readouterr().out
    assert SECRET not in out
    assert "oops ***" in _line(out, "platform")


def test_collect_returns_valid_checks(tmp_path: Path) -> None:
    checks = collect(tmp_path)

    assert checks and all(isinstance(check, Check) for check in checks)
    assert {check.status for check in checks} <= STATUSES
    for check in checks:
        assert check.name and check.value
        if check.status in ("warn", "problem"):
            assert check.fix, check
    names = _by_name(checks)
    for name in ("python", "platform", "torch", "8-bit AdamW", "mps", "disk (output)", "hf token", "offline"):
        assert name in names
    assert names["hf token"].value == "not set"
    assert "HF_HUB_OFFLINE=1" in names["offline"].value
    assert names["wandb mode"].value == "offline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        checks[0].status = "ok"  # type: ignore[misc]


def test_no_gpu_is_info_not_problem(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")

    gpu = _by_name(collect(tmp_path))["gpu"]

    assert gpu.status == "info"
    assert "slow on CPU" in gpu.value


def test_missing_package_is_problem_with_pip_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_version = importlib.metadata.version

    def fake_version(name: str) -> str:
        if name == "wandb":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)

    wandb = _by_name(collect(tmp_path))["wandb"]
    assert wandb.status == "problem"
    assert wandb.value == "not installed"
    assert wandb.fix is not None and "pip install" in wandb.fix and "wandb" in wandb.fix

    assert run_doctor(tmp_path) == 1
    out = capsys.readouterr().out
    assert "[PROBLEM]" in _line(out, "wandb")
    assert "-> fix: pip install 'wandb>=" in out


def test_old_torch_is_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "2.5.1+cu121" if name == "torch" else real_version(name)
    )

    (torch_check,) = doctor._check_torch()

    assert torch_check.status == "problem"
    assert torch_check.value.startswith("2.5.1+cu121 (")
    assert (
        torch_check.fix is not None and "weights_only" in torch_check.fix and "torch>=2.6" in torch_check.fix
    )


@pytest.mark.parametrize("version", ["2.6.0", "2.13.0+cpu", "2.10.1+cu128"])  # "2.13" < "2.6" as strings
def test_recent_torch_is_ok(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    pytest.importorskip("torch")
    _fake_versions(monkeypatch, torch=version)

    (torch_check,) = doctor._check_torch()

    assert torch_check.status == "ok", torch_check
    assert torch_check.value.startswith(f"{version} (")


def test_unreadable_torch_version_is_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    _fake_versions(monkeypatch, torch="garbage")

    (torch_check,) = doctor._check_torch()

    assert torch_check.status == "problem" and "weights_only" in (torch_check.fix or "")


def test_report_lists_every_pyproject_dependency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever pyproject.toml declares is what doctor checks: fed as sdtune's metadata (which pip writes
    from pyproject.toml at install), with a dev extra that must not be reported."""
    dependencies = _pyproject_dependencies()
    real_requires = importlib.metadata.requires
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: [*dependencies, 'pytest>=8; extra == "dev"'] if name == "sdtune" else real_requires(name),
    )

    text, code = report(tmp_path)

    assert capsys.readouterr().out == ""  # report() prints nothing; the CLI does
    assert code in (0, 1)
    for dependency in dependencies:
        _line(text, Requirement(dependency).name)
    _line(text, "huggingface_hub")
    assert not any(line.startswith("  pytest ") for line in text.splitlines())


def test_report_checks_installed_sdtune_requirements(tmp_path: Path) -> None:
    """Unfaked: the installed sdtune's own requirements (extras excluded) are each one line of the report."""
    try:
        lines = importlib.metadata.requires("sdtune") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sdtune is not installed (pip install -e .)")
    requirements = [Requirement(line) for line in lines]
    names = _by_name(collect(tmp_path))

    for req in requirements:
        if req.marker is None:
            assert req.name in names, req.name
            if req.name != "torch":
                assert names[req.name].status in ("ok", "warn", "problem")
        else:
            assert req.name not in names, req.name  # dev extras
    assert names["huggingface_hub"].status == "info"


def test_transformers_above_upper_pin_is_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    req = next(r for r in map(Requirement, _pyproject_dependencies()) if r.name == "transformers")
    assert not req.specifier.contains("5.24.0")  # the pin this test is about
    _fake_versions(monkeypatch, transformers="5.24.0")

    check = _by_name(collect(tmp_path))["transformers"]

    assert check.status == "problem"
    assert check.value.startswith("5.24.0 (too new; sdtune needs ")
    assert check.fix is not None
    assert "peft>=0.22" in check.fix and "pip install 'transformers<5.24" in check.fix
    assert run_doctor(tmp_path) == 1
    assert "[PROBLEM]" in _line(capsys.readouterr().out, "transformers")


@pytest.mark.parametrize("version", ["5.24.0rc1", "6.0.0"])
def test_prerelease_or_major_above_upper_pin_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    _fake_versions(monkeypatch, transformers=version)
    assert _by_name(collect(tmp_path))["transformers"].status == "problem"


def test_old_diffusers_is_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_versions(monkeypatch, diffusers="0.30.3")

    check = _by_name(collect(tmp_path))["diffusers"]

    assert check.status == "problem"  # the training stack: sdtune calls APIs older diffusers lacks
    assert check.value == "0.30.3 (too old; sdtune needs >=0.35)"
    assert check.fix == "sdtune needs diffusers>=0.35; pip install -U 'diffusers>=0.35'"


def test_prerelease_inside_range_is_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_versions(monkeypatch, diffusers="0.99.0.dev0")
    assert _by_name(collect(tmp_path))["diffusers"].status == "ok"


def test_old_non_training_package_is_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_versions(monkeypatch, wandb="0.18.7", tqdm="not a version")

    checks = _by_name(collect(tmp_path))

    assert checks["wandb"].status == "warn"
    assert checks["wandb"].fix == "sdtune is tested with wandb>=0.19; pip install -U 'wandb>=0.19'"
    assert checks["tqdm"].status == "warn" and "not a PEP 440 version" in checks["tqdm"].value


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("diffusers", "pip install 'diffusers>=0.35'"),
        ("pillow-heif", "pip install 'pillow-heif>=1.0'"),
        ("huggingface_hub", "pip install huggingface_hub"),  # indirect: no pin of sdtune's own
    ],
)
def test_other_missing_packages_are_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fix: str
) -> None:
    _fake_versions(monkeypatch, **{name.replace("-", "_"): None})

    check = _by_name(collect(tmp_path))[name]

    assert check.status == "problem" and check.value == "not installed"
    assert check.fix == fix


def test_missing_sdtune_metadata_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_requires = importlib.metadata.requires

    def no_sdtune(name: str) -> list[str] | None:
        if name == "sdtune":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_requires(name)

    monkeypatch.setattr(importlib.metadata, "requires", no_sdtune)

    text, code = report(tmp_path)

    assert capsys.readouterr().out == ""
    packages = _line(text, "packages")
    assert "metadata not found" in packages and "[warning]" in packages
    assert "pip install -e ." in text
    assert "check failed" not in text and "Traceback" not in text
    _line(text, "torch")  # still checked, against the weights_only safety floor
    _line(text, "huggingface_hub")
    assert code in (0, 1)


def test_run_doctor_prints_what_report_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "report", lambda output_dir=None: ("sdtune doctor\nfake body", 7))
    assert run_doctor(tmp_path) == 7
    assert capsys.readouterr().out == "sdtune doctor\nfake body\n"


def test_crashing_check_becomes_problem_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_disk_usage(path: object) -> DiskUsage:
        raise OSError("disk on fire")

    monkeypatch.setattr(shutil, "disk_usage", broken_disk_usage)

    disk = _by_name(collect(tmp_path))["disk (output)"]
    assert disk.status == "problem"
    assert "OSError: disk on fire" in disk.value

    assert run_doctor(tmp_path) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "OSError: disk on fire" in _line(captured.out, "disk (output)")


def test_low_disk_warns_and_walks_up_to_existing_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def small_disk(path: object) -> DiskUsage:
        seen.append(str(path))
        return DiskUsage(total=100 * 1024**3, used=98 * 1024**3, free=2 * 1024**3)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    missing = tmp_path / "runs" / "not-yet"

    checks = _by_name(collect(missing))

    disk = checks["disk (output)"]
    assert disk.status == "warn"
    assert "2.0 GiB free" in disk.value and "not created yet" in disk.value
    assert disk.fix is not None
    assert str(tmp_path) in seen  # the nearest existing folder was measured
    assert checks["disk (sdtune)"].status == "warn"


def test_accelerate_config_present_and_absent(tmp_path: Path) -> None:
    config = tmp_path / "default_config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n")

    (present,) = doctor._check_accelerate_config(config)
    assert present.status == "info"
    assert str(config) in present.value
    assert "distributed_type=MULTI_GPU" in present.value
    assert "num_processes=2" in present.value
    assert "mixed_precision=unset" in present.value

    (absent,) = doctor._check_accelerate_config(tmp_path / "nope.yaml")
    assert absent.status == "info"
    assert absent.value.startswith("not configured (defaults: single process)")

    config.write_text("- just\n- a list\n")
    (broken,) = doctor._check_accelerate_config(config)
    assert broken.status == "problem" and broken.fix

    # an FSDP config: sdtune runs FSDP2 only (accelerate's default is 1)
    config.write_text("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_auto_wrap_policy: SIZE_BASED_WRAP\n")
    (fsdp1,) = doctor._check_accelerate_config(config)
    assert fsdp1.status == "problem" and "fsdp_version: 2" in fsdp1.fix
    (shipped,) = doctor._check_accelerate_config(ROOT / "recipes/accelerate/fsdp.yaml")
    assert shipped.status == "info" and "distributed_type=FSDP" in shipped.value


def test_adamw8bit_failure_is_reported_with_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    bnb = pytest.importorskip("bitsandbytes")

    class Broken:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Broken)

    (check,) = doctor._check_adamw8bit()

    assert check.status == "problem"
    assert "RuntimeError: no kernel for this device" in check.value
    assert "second line" not in check.value
    assert check.fix == "use train.optimizer=adamw"


def test_adamw8bit_runs_here() -> None:
    """bitsandbytes >= 0.50 runs 8-bit AdamW on CPU too, so on this project's supported installs it works."""
    pytest.importorskip("bitsandbytes")

    (check,) = doctor._check_adamw8bit()

    assert check.status == "ok", check
    assert check.value.startswith("works on ")


def test_import_does_not_pull_in_heavy_modules() -> None:
    # Load the file directly so the result doesn't depend on what sdtune/__init__.py imports.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('doctor_probe', {doctor.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['doctor_probe'] = module  # dataclasses look their module up here\n"
        "spec.loader.exec_module(module)\n"
        "heavy = {'torch', 'bitsandbytes', 'diffusers', 'transformers', 'accelerate', 'huggingface_hub'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_transformers_newer_than_peft_supports_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers 5.24 asks for peft>=0.22 for text-encoder adapters; this is what breaks installs
    from transformers.integrations import peft as tf_peft

    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", "99.0.0")
    [check] = doctor._check_peft_for_transformers()
    assert check.status == "problem" and "peft>=99.0.0" in check.value and "transformers<" in (check.fix or "")
