"""``python -m vblora_store`` runs the command line."""

from .cli import main

main()
