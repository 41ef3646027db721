"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class RetokError(Exception):
    """A problem with the user's input that they can fix; the message says what and how."""

    exit_code = 2
