"""The documentation: its examples run as written and say what the code does."""
