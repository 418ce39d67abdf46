"""The smallest gateway: one handler that answers with what it was sent.

trio-wsgate serve --app examples/echo.py:gateway
"""

from typing import Any

from trio_wsgate import Gateway, Session

gateway = Gateway()


@gateway.on("echo")
async def echo(session: Session, data: Any) -> Any:
    return data
