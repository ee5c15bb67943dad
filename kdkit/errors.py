"""One exception type for user-facing failures: the CLI prints its message on one line and exits 2."""


class KdkitError(Exception):
    """A problem with the user's input or environment, stated with the file involved and what to do."""


class BadImage(Exception):
    """An image that cannot be decoded (corrupt, truncated, not an image); carries the reason."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that tells how to continue (the CLI prints it and exits 130)."""


class OptionError(KdkitError, ValueError):
    """An option value outside what it can mean (a config built in Python, or a flag): names the option
    and the allowed range. A ValueError too, so library callers can catch it the usual way."""
