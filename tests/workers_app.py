"""The application of tests/test_workers.py: it says which worker answers."""

from __future__ import annotations

import os
from typing import Any

from trio_wsgate import Gateway, Session

gateway = Gateway()


@gateway.on("where")
async def where(session: Session, data: Any) -> int:
    return os.getpid()
