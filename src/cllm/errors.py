"""The one exception type that means "the user asked for something we cannot do"."""


class CllmError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, exit 2."""
