"""ConfigError, the one error of a bad option value (its own module so that the model catalog,
which config.py reads for the --model choices, can raise it too)."""


class ConfigError(ValueError):
    """A bad option value; the CLI prints it and exits before any training."""
