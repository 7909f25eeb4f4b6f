"""The one exception type for bad input that the CLI reports as a clear message, without a traceback."""


class PipelineError(Exception):
    """Bad input or state a user can fix: the message names the file, caption, shard or flag."""
