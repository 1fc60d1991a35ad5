"""Errors the CLI reports as one clear line (no traceback unless ``--debug``)."""


class VLPromptError(Exception):
    """A user-facing error: bad input, a missing file, an inconsistent configuration."""


class DataError(VLPromptError):
    """A dataset, split file, image or CSV could not be used; the message names the file or class."""


class BackboneError(VLPromptError):
    """A model could not be built or its weights could not be found or loaded."""


class CheckpointError(VLPromptError):
    """A checkpoint or exported head is missing, corrupted or does not match the run."""


class NonFiniteError(VLPromptError):
    """A loss, gradient or transport plan became NaN or infinite."""


class ConfigError(VLPromptError):
    """A configuration field is out of range, of the wrong type, unknown, or combined with one that makes it
    meaningless; the message names the field (or flag) and the value."""
