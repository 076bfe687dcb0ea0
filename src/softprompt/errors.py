"""The one exception type for mistakes a user can fix (bad path, bad flag, bad file)."""


class UserError(Exception):
    """Raised for input a user can correct; the CLI prints it as one line and exits with 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the user should know (printed as is; empty: nothing)."""
