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


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of ``e``'s message, at most ``limit`` characters, or its type's name when it has none
    (``AssertionError()``: a library's bare assert must still give one readable line)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def error_summary(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, or the type alone for an exception that says nothing."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    first = lines[0]
    if len(first) > limit:  # cut at a word, and say so: "...try aga" reads as a typo
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {first}"
