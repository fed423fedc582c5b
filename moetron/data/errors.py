"""The one error the data pipeline raises for bad user input."""


class DataError(ValueError):
    """Data is missing, empty, unreadable or not in a supported format; the message names the path."""
