"""The one error type for mistakes in the user's data or parameters."""


class PipelineError(Exception):
    """An error caused by the user's data or parameters; its message says what to fix."""
