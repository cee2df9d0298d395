"""Errors a user can fix: the command line prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input: a missing file, a malformed prompt file, a prompt outside a world's grammar, ..."""
