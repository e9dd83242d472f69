"""``python -m forkserver`` runs the same command as ``forkserver``."""

from .cli import main

main()
