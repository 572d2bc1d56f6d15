"""Typed errors. Library code raises these; the CLIs turn them into one-line messages and exit 1."""


class MinicpmError(Exception):
    """Base class for every error meant for the user: ``str(error)`` is the one-line message."""


class InputError(MinicpmError):
    """A raw input could not be read or parsed (names the file and, where known, the line)."""


class FormatError(MinicpmError):
    """The source format is unknown, ambiguous, or records do not fit the chosen format."""


class TokenizerError(MinicpmError):
    """A tokenizer could not be loaded, or its chat template is not one we can render exactly."""
