"""The one exception type for mistakes a user can fix (bad key, missing folder, unreadable image)."""


class SdtuneError(Exception):
    """A user-fixable problem. The CLI prints its message as one ``error:`` line and exits non-zero."""
