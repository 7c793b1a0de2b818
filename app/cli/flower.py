"""``sluice flower``: Flower on Sluice's Celery app, every page behind basic auth.

Flower's own basic auth leaves ``/metrics`` and ``/healthcheck`` open by
design (its docs list them as exempt), and passing ``--basic_auth=user:pw``
puts the password in every ``ps`` listing.  Here the credentials reach Flower
through its ``FLOWER_BASIC_AUTH`` environment variable, and every route's
handler — API, pages, static files, metrics, health check — first checks
them.
"""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from base64 import b64decode
from collections.abc import Awaitable
from typing import Any

import click

#: Flower's name for its basic-auth option, read from the environment.
FLOWER_BASIC_AUTH = "FLOWER_BASIC_AUTH"


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True)
@click.option("--host", envvar="SLUICE_HOST", default="127.0.0.1", show_default=True,
              help="Address to listen on [env SLUICE_HOST].")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, host: str, flower_args: tuple[str, ...]) -> None:
    """Run Flower on Sluice's Celery app; every page needs the basic-auth credentials.

    Credentials come from SLUICE_FLOWER_USER and SLUICE_FLOWER_PASSWORD. Without
    them Flower refuses to start, unless SLUICE_DEV=1: then it makes up a
    password for this run and prints it.
    """
    user = os.environ.get("SLUICE_FLOWER_USER", "") or "admin"
    password = os.environ.get("SLUICE_FLOWER_PASSWORD", "")
    if not password:
        if os.environ.get("SLUICE_DEV") != "1":
            raise click.UsageError("refusing to start Flower without SLUICE_FLOWER_USER and "
                                   "SLUICE_FLOWER_PASSWORD")
        password = secrets.token_urlsafe(12)
        click.echo(f"flower: no SLUICE_FLOWER_PASSWORD; user {user!r}, password {password!r} "
                   "for this run")
    if ":" in user or "," in user + password:
        raise click.UsageError("SLUICE_FLOWER_USER may not contain ':' or ',', nor "
                               "SLUICE_FLOWER_PASSWORD ','")
    if any(arg.lstrip("-").startswith("basic_auth") for arg in flower_args):
        raise click.UsageError("give Flower's credentials in SLUICE_FLOWER_USER and "
                               "SLUICE_FLOWER_PASSWORD, never on the command line")
    os.environ[FLOWER_BASIC_AUTH] = f"{user}:{password}"
    protect_every_route()
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", "workers.make_celery", "flower", f"--port={port}",
                f"--address={host}", *flower_args]
    sys.stdout.flush()
    celery_main()


def protect_every_route() -> None:
    """Make every handler of Flower's URL table answer 401 without the basic-auth credentials.

    Flower reads its table when its application is built, so this must run
    before Flower starts.
    """
    from flower import urls

    urls.handlers[:] = [_guarded(spec) for spec in urls.handlers]


def _guarded(spec: Any) -> Any:
    from tornado.routing import URLSpec

    if isinstance(spec, URLSpec):
        return URLSpec(spec.regex.pattern, _guard(spec.handler_class), spec.kwargs, spec.name)
    return (spec[0], _guard(spec[1]), *spec[2:])


def _guard(handler: type[Any]) -> type[Any]:
    def prepare(self: Any) -> Awaitable[None] | None:
        if not authorized(self.request.headers.get("Authorization", ""),
                          self.application.options.basic_auth or ()):
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="flower"')
            self.finish("Access denied")
            return None
        result: Awaitable[None] | None = handler.prepare(self)
        return result

    return type(f"Guarded{handler.__name__}", (handler,), {"prepare": prepare})


def authorized(header: str, credentials: Any) -> bool:
    """Whether an ``Authorization`` header carries one of ``credentials`` (``user:password``)."""
    scheme, _, value = header.partition(" ")
    if scheme != "Basic" or not credentials:
        return False
    try:
        given = b64decode(value.strip(), validate=True).decode()
    except ValueError:
        return False
    # Compare with every one, so the time taken does not tell which was close.
    return sum(hmac.compare_digest(given.encode(), c.encode()) for c in credentials) > 0
