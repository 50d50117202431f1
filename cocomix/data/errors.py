"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A data problem; the message is one line naming the path and what was expected."""
