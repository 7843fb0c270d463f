"""One exception family for bad input; cli.py maps it to exit code 2."""


class WeatInputError(Exception):
    """Bad input from the user: an invalid preset, a missing dataset file, a foreign checkpoint...

    The message is one line that names the field, file or value and says what was expected.
    """


class WeatRunError(Exception):
    """A failure while running (non-finite loss, unwritable output); cli.py maps it to exit 1."""
