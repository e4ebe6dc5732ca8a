"""User-facing errors: one clear line, a non-zero exit, never a traceback."""


class MpqcError(Exception):
    """A problem with the user's input that they can fix; the message says what and how."""

    exit_code = 2
