"""The run's experiment tracker (``train.report_to``: TensorBoard or W&B, started by Accelerate), checked
before the run loads anything and continued, not restarted, by a resume.

- ``problems``: what would stop the tracker from starting, found by ``sdtune.plan.check_run``: W&B in online
  mode with no API key, asked of wandb's own credential lookup (``WANDB_API_KEY``, ``.netrc``, its settings
  files), without the network;
- ``init_kwargs``: what ``Accelerator.init_trackers`` passes to the tracker. TensorBoard: on a resume,
  ``purge_step`` = the resumed step + 1, so TensorBoard hides what earlier runs logged past it (a rewind's
  abandoned steps, or the steps a killed run logged after its last checkpoint, which this run trains again).
  W&B: the run folder keeps its W&B run id (``wandb_run_id.txt``), and every start passes it with
  ``resume="allow"`` and the folder's name, so a resume continues the same W&B run;
- ``start_error``: a tracker that fails to start anyway (no network, a refused key) as one ``SdtuneError``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError, first_line
from sdtune.files import write_text
from sdtune.runs import LOSSES

WANDB_RUN_ID = "wandb_run_id.txt"  # in the run folder: the W&B run every start of this run logs to
WANDB_FIX = ("fix: `wandb login`, or set WANDB_API_KEY, or WANDB_MODE=offline to log on this machine only "
             "(`wandb sync` uploads it later), or train.report_to=tensorboard")


def problems(report_to: str) -> list[str]:
    """What would stop ``report_to``'s tracker from starting, one line each: W&B in online mode without
    credentials (wandb.init would stop the run after the model loaded: it cannot prompt without a terminal).
    Reads the environment and wandb's settings files, as wandb.init does; never the network."""
    if report_to != "wandb" or importlib.util.find_spec("wandb") is None:
        return []  # not installed: sdtune.plan says so itself
    import wandb
    from wandb.sdk import wandb_setup

    # the settings wandb.init starts from: WANDB_MODE and the other variables, and the settings files
    settings = wandb_setup.singleton().settings
    if settings._offline or settings._noop:  # WANDB_MODE=offline / dryrun / disabled: no key is needed
        return []
    try:
        found = _has_credentials(settings)
    except wandb.errors.Error as e:  # a key of the wrong form: "WANDB_API_KEY invalid: ... 40+ characters"
        return [f"train.report_to: wandb: {first_line(e).rstrip('.')}; {WANDB_FIX}"]
    if found is False:
        return [f"train.report_to: wandb has no API key configured, and runs {settings.mode}; {WANDB_FIX}"]
    return []


def _has_credentials(settings: Any) -> bool | None:
    """Whether wandb finds credentials for its server: wandb's own lookup, without a prompt or the network;
    None when this wandb's internals are not the ones known here (wandb.init then says it, see
    ``start_error``)."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # older wandb (0.19): the same lookup (settings / WANDB_API_KEY, .netrc) lived here
        try:
            from wandb.sdk.lib.apikey import api_key
        except ImportError:
            return None
        return api_key(settings=settings) is not None
    try:
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(host=host, source="sdtune", prompt=False, update_session=False)
    except (TypeError, AttributeError):  # another signature than wandb 0.31's
        return None
    return auth is not None


def init_kwargs(report_to: str, output_dir: Path, step: int,
                resumed: bool) -> tuple[dict[str, dict], list[str]]:
    """``Accelerator.init_trackers``' ``init_kwargs`` for ``report_to``, and lines to log (a W&B run that
    keeps a rewind's abandoned steps). ``step``: the step the run continues from (0 for a new run);
    ``resumed``: ``train.resume`` is set. Writes the W&B run id into ``output_dir`` (main process only)."""
    if report_to == "tensorboard":
        # SummaryWriter(purge_step=N): TensorBoard hides the events of earlier event files at steps >= N.
        # This run logs step + 1 first; what lies there (an abandoned branch, a killed run's last steps)
        # is replaced.
        return ({"tensorboard": {"purge_step": step + 1}} if resumed else {}), []
    if report_to == "wandb":
        return _wandb_kwargs(output_dir, step)
    return {}, []


def _wandb_kwargs(output_dir: Path, step: int) -> tuple[dict[str, dict], list[str]]:
    """wandb.init's arguments: the run folder's W&B run id (made on its first start), resumed if it exists."""
    from wandb.sdk.lib.runid import generate_id  # the ids wandb.init draws itself

    path = output_dir / WANDB_RUN_ID
    known = path.is_file() and path.read_text().strip()
    run_id = known or generate_id()
    if not known:
        write_text(path, run_id + "\n")
    kwargs = {"dir": str(output_dir), "id": run_id, "resume": "allow", "name": output_dir.name}
    logged = last_logged_step(output_dir)
    notes = []
    if known and logged > step:
        # W&B's rewind (wandb.init(resume_from="<id>?_step=N")) truncates a run's history on W&B's server
        # only, a preview feature there; an offline run records the request and nothing truncates it.
        notes.append(f"W&B run {run_id} keeps steps {step + 1}-{logged}, which an earlier run logged past "
                     f"step {step}, and ignores this run's logs up to step {logged} (a W&B run's steps only "
                     f"increase); TensorBoard and {LOSSES} show this run's own")
    return {"wandb": kwargs}, notes


def last_logged_step(output_dir: Path) -> int:
    """The highest step in the run folder's ``losses.jsonl`` (0 when none): what the tracker was last sent."""
    path = output_dir / LOSSES
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    return max(steps)


def start_error(report_to: str, error: Exception) -> SdtuneError | None:
    """One line for a tracker that failed to start (W&B: no key, no network, a run id W&B refuses); None for
    an error that is not the tracker's own."""
    if report_to != "wandb" or importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    if not isinstance(error, wandb.errors.Error):
        return None
    return SdtuneError(f"train.report_to: wandb could not start its run: {first_line(error).rstrip('.')}; "
                       "fix: check the network and the key (`wandb login --relogin`), or WANDB_MODE=offline "
                       "to log on this machine only, or train.report_to=tensorboard")
