"""The one exception type gsae raises for user mistakes; the CLI prints it as a single line."""


class GsaeError(ValueError):
    """A problem with the user's input: the message says what was wrong and what is allowed."""
