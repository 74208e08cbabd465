"""The `svd-fast` subcommands, one module each (``add_parser`` + ``run``); errors.py holds the one-line
user-error contract they share. svd_fast/cli.py dispatches to them."""
