"""The command line: its options and the first commands a newcomer types."""
