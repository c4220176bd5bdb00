"""The converter's one error type: a message meant for the user, printed as one line."""


class ConversionError(ValueError):
    """A conversion that cannot proceed (bad input, mismatch, existing output)."""
