"""The two exceptions the CLI turns into exit codes. Any module may raise them; importing them
costs nothing, so a module that only raises an error does not load the params schema."""


class UserError(Exception):
    """Bad usage or bad input: the CLI prints the message on one line and exits with 2."""


class GateFailed(Exception):
    """A quality gate said no: the CLI prints the message and exits with 1."""
