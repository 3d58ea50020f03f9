"""The one exception type for bad configuration; the CLI turns it into one line and exit status 2."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the problem and the fix."""
