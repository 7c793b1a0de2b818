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
from typing import Any

import click

from tasks.config import Settings

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
    if not Settings.from_env().task_events:
        # Flower would otherwise switch every worker's task events back on
        # (enable_events every few seconds), undoing SLUICE_TASK_EVENTS=0.
        sys.argv.append("--enable_events=False")
    sys.stdout.flush()
    celery_main()


def protect_every_route() -> None:
    """Make Flower answer 401 to any request without the basic-auth credentials.

    The check sits where tornado picks a request's handler
    (``Application.get_handler_delegate``, meant to be overridden), so it covers
    every route: Flower's table, tornado's own static route and the 404
    handler alike.  Must run before Flower builds its application.
    """
    from flower import command
    from flower.app import Flower
    from tornado.web import RequestHandler

    class Unauthorized(RequestHandler):
        def prepare(self) -> None:
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="flower"')
            self.finish("Access denied")

    class GuardedFlower(Flower):  # type: ignore[misc]  # flower ships no types
        def get_handler_delegate(self, request: Any, target_class: Any,
                                 target_kwargs: Any = None, path_args: Any = None,
                                 path_kwargs: Any = None) -> Any:
            if not authorized(request.headers.get("Authorization", ""),
                              self.options.basic_auth or ()):
                target_class, target_kwargs = Unauthorized, None
            return super().get_handler_delegate(request, target_class, target_kwargs,
                                                path_args, path_kwargs)

    command.Flower = GuardedFlower


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
