"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, model path). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2
