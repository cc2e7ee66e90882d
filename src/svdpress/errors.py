"""One exception type for every mistake a user can make.

The CLI turns `SvdpressError` into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Library code raises it with a message that says what was wrong and what to do instead.
"""


class SvdpressError(Exception):
    """A user-facing error: bad input, missing file, unsupported model. Exit code 2 in the CLI."""

    exit_code = 2
