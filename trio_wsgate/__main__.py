"""``python -m trio_wsgate serve``."""

from .cli import main

main()
