"""User-facing errors: one line that names the problem and the fix."""


class SaealignError(Exception):
    """An error caused by input or environment, reported to the user without a traceback."""


class ModelNotFoundError(SaealignError):
    """The requested language model cannot be loaded."""


class SAEMismatchError(SaealignError):
    """An SAE does not fit the model or hook it is used with."""


class TopicExistsError(SaealignError):
    """A topic of that name is already scored for the dataset (the service answers HTTP 409)."""
