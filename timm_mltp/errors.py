"""The one exception type for bad input: the recipe prints it without a traceback."""


class MLTPConfigError(ValueError):
    """Raised for bad user input; the message says what was given, what was expected and how to fix it."""
