"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class RetokError(Exception):
    """A problem with the user's input that they can fix; the message says what and how."""

    exit_code = 2


class PartialOutput(RetokError):
    """The stage's main output is complete and valid, but an optional part the config asked for could not be
    made (a GGUF next to the exported folder): the folder is kept, and the run still exits 2 with the reason."""
