"""One exception type for problems a user can fix; the CLI prints it as one line."""


class MeanNavError(Exception):
    """A user-facing error: one sentence naming the file or field and what to do."""
