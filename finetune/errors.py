"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class FinetuneError(Exception):
    """A problem the user can fix: the message names the file or key and says what to do."""


class ConfigError(FinetuneError):
    """A config file or override that does not fit the recipe's typed config."""
