"""The build: setup.py's decisions, what the built library holds, the installed package."""
