"""One exception type for user-facing failures: the CLI prints its message on one line and exits 2."""


class KdkitError(Exception):
    """A problem with the user's input or environment, stated with the file involved and what to do."""


class BadImage(Exception):
    """An image that cannot be decoded (corrupt, truncated, not an image); carries the reason."""
