"""Errors the user can fix. The CLI prints their message as one line and exits non-zero; any other
exception is a bug and keeps its traceback."""


class DifflensError(Exception):
    """Base of every user-facing error: the message names the problem and the fix."""


class ModelLoadError(DifflensError, ValueError):
    """A model spec that cannot be loaded."""


class UnknownWordError(DifflensError, ValueError):
    """A prompt uses a word the demo tokenizer does not know."""


class PromptFileError(DifflensError, ValueError):
    """A prompt file that is missing, empty or malformed."""


class UnknownLayerError(DifflensError, ValueError):
    """A hook point that the model does not have."""
