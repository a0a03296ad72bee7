"""Hugging Face hub ids: the one rule for what counts as ``owner/name``, shared by push, export and models.

A hub id here is what ``huggingface_hub.utils.validate_repo_id`` accepts *and* has exactly one "/" with
both sides non-empty (the Hub also allows a bare "name", but sdtune always wants the owner spelled out).
Where a string could be either a local folder or a hub id (``model.pretrained``), a local path wins: an
existing path, or anything starting with ".", "/" or "~", is never a hub id, so a path is never published
as if it were a model name.

huggingface_hub is imported inside `_why_not_repo_id`: importing its validator costs about 45-60 ms
(``python -X importtime``), and the CLI imports sdtune modules while it builds its parser.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from sdtune.errors import SdtuneError

__all__ = ["check_repo_id", "is_hub_id", "offline_reason", "offline_unless_reachable", "public_model_id"]

logger = logging.getLogger(__name__)
_UNREACHABLE = "the Hub cannot be reached from here"
_switched_offline: list[str] = []  # [endpoint] once `offline_unless_reachable` found it unreachable

_EXAMPLE = "user/my-dog-lora"
_PATH_STARTS = (".", "/", "~")


def _why_not_repo_id(name: str) -> str | None:
    """Why ``name`` is not an ``owner/name`` repo id, in a few words; None when it is one."""
    if not name:
        return "it is empty"
    if name.startswith(_PATH_STARTS):
        return "it looks like a local path"
    if name.count("/") != 1 or not all(name.split("/")):
        return "it needs exactly one '/' between owner and name"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        # Its messages are long and quote the id again; this is the rule they all come from.
        return "use only letters, digits, '-', '_' and '.', no '--' or '..', at most 96 per part"
    return None


def is_hub_id(name: str) -> bool:
    """True if ``name`` is an ``owner/name`` hub id and not a local path (existing, or starting with . / ~)."""
    if _why_not_repo_id(name) is not None:
        return False
    # Checked after the syntax so odd strings never reach the filesystem; a folder "a/b" here shadows the id.
    return not Path(name).expanduser().exists()


def check_repo_id(repo: str, key: str) -> None:
    """Raise `SdtuneError` (one line naming the option ``key``) unless ``repo`` is an ``owner/name`` repo id.

    This checks a destination on the Hub (``push --repo``), so a local folder of the same name is no
    reason to refuse it; only the spelling is checked, nothing is looked up online.
    """
    reason = _why_not_repo_id(repo)
    if reason is not None:
        raise SdtuneError(f"{key}: '{repo}' is not a Hugging Face repo id ({reason}); "
                          f"fix: use owner/name, like {_EXAMPLE}")


def public_model_id(model: str | None) -> str | None:
    """``model`` if it is a hub id (safe to publish), else None: a local folder, a path, or nothing."""
    return model if model and is_hub_id(model) else None


def offline_reason() -> str:
    """Why huggingface_hub is offline, in a few words: the Hub did not answer, or ``HF_HUB_OFFLINE``."""
    return _UNREACHABLE if _switched_offline else "HF_HUB_OFFLINE is set"


@functools.cache
def offline_unless_reachable(timeout: float = 5.0) -> bool:
    """Ask the Hub once, with no retries, whether it answers; if it does not, switch huggingface_hub (and the
    processes this one starts) to offline mode, so that every later hub lookup reads the local cache at once.
    True when offline.

    Why: with no network, each ``hf_hub_download`` retries five times with back-off (about 25 s) before it
    falls back to the cache or fails, and loading a model makes a dozen such calls. One HEAD through
    huggingface_hub's own HTTP session (its proxies and ``HF_ENDPOINT`` included) settles it up front."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # DNS, refused, timeout, TLS, proxy: the Hub cannot be reached from here
        logger.info(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
                    f"({type(e).__name__}): hub ids (models, datasets) are read from the local cache only")
        # huggingface_hub reads this at each request (constants.is_offline_mode); transformers and diffusers
        # ask it too. The environment variable carries it into class-image and accelerate subprocesses.
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        _switched_offline[:] = [constants.ENDPOINT]
        return True
    return False
