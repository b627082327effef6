"""One-line error messages: the scripts turn exceptions into `error: ...` lines, never tracebacks."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
