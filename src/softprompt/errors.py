"""The one exception type for mistakes a user can fix (bad path, bad flag, bad file)."""


class UserError(Exception):
    """Raised for input a user can correct; the CLI prints it as one line and exits with 2."""
