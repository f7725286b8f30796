"""``python -m app`` runs the ``evq`` command line."""

from app.cli import main

main()
