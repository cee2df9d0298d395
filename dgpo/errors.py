"""Errors a user can fix: the command line prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input: a missing file, a malformed prompt file, a prompt outside a world's grammar, ..."""


def shown(text, limit: int = 60) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters (a 480k-character prompt is not repeated whole)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."
