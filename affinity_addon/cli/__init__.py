"""The `affinity proxy` and `affinity run` subcommands: the installed tool, no checkout needed."""
