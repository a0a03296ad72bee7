"""The one exception type for mistakes a user can fix (bad key, missing folder, unreadable image)."""


class SdtuneError(Exception):
    """A user-fixable problem. The CLI prints its message as one ``error:`` line and exits non-zero."""


class Interrupted(SdtuneError):
    """SIGINT / SIGTERM: the run stopped after a step and saved a checkpoint. ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class DiskFull(SdtuneError):
    """The disk filled up during a write; what was half-written is gone and earlier files are intact."""


class KohyaUnavailable(SdtuneError):
    """The model's family has no kohya LoRA layout in sdtune yet (FLUX): only the diffusers format is written."""
