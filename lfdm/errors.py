"""The one base of the errors a user can act on."""


class UserError(Exception):
    """Bad params, data or inputs, a diverged run, a tracking store that failed when required: the message
    names the file, key, flag or value and what to do, so command lines print it without a traceback."""


class MissingInput(UserError, FileNotFoundError):
    """An input that does not exist (a path mistyped, or the stage that makes it has not run)."""


class UnreadableInput(UserError, ValueError):
    """An input that exists but cannot be read as what it should be (a corrupt or foreign file)."""
