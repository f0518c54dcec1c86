"""Prefect's temporary local server, as `skinsense pipeline` uses it without PREFECT_API_URL.

Without `PREFECT_API_URL` a flow run starts Prefect's temporary ("ephemeral") API server in a
subprocess and waits for it `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` (Prefect's
default: 20 s). Its first start in a new `PREFECT_HOME` creates and migrates the SQLite
database, which takes longer than that on a busy 2-core machine: a newcomer's very first
`./run pipeline` failed with "Timed out while attempting to connect to ephemeral Prefect API
server". So the pipeline gives the first start the time it needs, unless the user chose a
timeout, and turns a start that still fails into a message that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.settings.profiles import load_current_profile

# Measured: 11 s on an idle 2-core machine, 28 s on a loaded one, for the first start in a
# fresh PREFECT_HOME. Prefect waits this long only while the server is still starting.
FIRST_START_TIMEOUT_S = 180
TIMEOUT_VARIABLE = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.name
_PREFECT_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API server"


class TemporaryServerError(RuntimeError):
    """Prefect's temporary server did not start; the message says why and what to do."""


def user_chose_timeout() -> bool:
    """True when the startup timeout is set in the environment or the active Prefect profile."""
    if TIMEOUT_VARIABLE in os.environ:
        return True
    return any(setting.name == TIMEOUT_VARIABLE for setting in load_current_profile().settings)


@contextmanager
def temporary_server_settings() -> Iterator[int | None]:
    """Run a flow inside this to give Prefect's temporary server the time its first start needs.

    Yields the startup timeout in force (None when a server is configured with
    PREFECT_API_URL, so no temporary server starts).

    Raises:
        TemporaryServerError: the temporary server did not answer in time.
    """
    if PREFECT_API_URL.value():
        yield None
        return
    timeout = (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() if user_chose_timeout()
               else FIRST_START_TIMEOUT_S)
    try:
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
            yield timeout
    except RuntimeError as exc:
        if _PREFECT_TIMEOUT_MESSAGE not in str(exc):
            raise
        raise TemporaryServerError(explain_timeout(timeout, str(exc))) from exc


def explain_timeout(timeout: int, prefect_message: str) -> str:
    """What happened when the temporary server did not start, and what to do about it."""
    said = prefect_message.split(_PREFECT_TIMEOUT_MESSAGE, 1)[-1].strip(" .\n")
    return (
        f"Prefect's temporary API server did not answer within {timeout} s "
        f"({TIMEOUT_VARIABLE}). Its first start in a new PREFECT_HOME ({PREFECT_HOME.value()}) "
        f"creates and migrates its database, which is slow on a busy machine. Nothing was "
        f"trained or lost. What to do: run the same command again (the database is kept, so "
        f"the next start is quicker); or allow more time, e.g. "
        f"{TIMEOUT_VARIABLE}=600; or start a long-running server once (`./run stack up`, or "
        f"`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api."
        + (f"\nThe server process said (if it stopped with an error, Prefect still waited "
           f"the whole {timeout} s; fix what it says first): {said[-2000:]}" if said else "")
    )
