"""One-line error messages: the scripts turn exceptions into `error: ...` lines, never tracebacks."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def data_error_line(error: BaseException) -> str:
    """One line for an error met while reading data: a DataLoader worker's error ("Caught ValueError in DataLoader
    worker process 0." followed by the worker's traceback) is reduced to the worker's own message, which names the
    file."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and len(lines) > 1:
        last = lines[-1].strip()
        return last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ": ") else last
    return first_line(error)
