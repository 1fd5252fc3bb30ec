"""Reading an exception a library raised: what it was raised from, and whether it says that a file could not
be written (a full disk), which torch hides under an error of its own."""
from __future__ import annotations

from cnnexp.checks import first_line


def error_chain(err: BaseException) -> list[BaseException]:
    """err and what it was raised from or while handling, as a traceback would show them."""
    found: list[BaseException] = []
    while err is not None and all(err is not seen for seen in found):
        found.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return found


def write_failure(err: BaseException) -> str | None:
    """Why a file could not be written, where that is what err says: an OSError's own words, found also
    under torch.save's RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos ..."),
    which is all torch says of a full disk; None for any other error."""
    for found in error_chain(err):
        if isinstance(found, OSError):
            return found.strerror or str(found)
    if isinstance(err, RuntimeError) and ("inline_container.cc" in str(err) or "PytorchStreamWriter" in str(err)):
        return f"torch could not write the file: {first_line(err)}"
    return None
