"""Work a process does at start so that its first job or request does not.

Every first use is lazy: the first Redis command opens the pool's first
connection, a script's first call is answered ``NOSCRIPT`` and loaded, the
first token count loads a tiktoken encoding (100-200 ms).  Jobs spread over
all worker processes (each waits in ``BRPOP`` and Redis serves the longest
waiting), so an idle deployment of N processes paid these costs on N jobs.
Front ends and workers call these at start (``FrontEnd.warm``,
``WorkerRuntime.warm``); both are best effort.
"""

from __future__ import annotations

import redis
from redis.commands.core import Script

from tasks.tokens import count_message_tokens


def load_scripts(client: redis.Redis, *owners: object) -> int:
    """Connect ``client`` and load every Lua script the ``owners`` registered, in one round trip.

    :param owners: objects holding scripts from ``register_script`` as attributes
        (:class:`~tasks.jobs.JobStore`, :class:`~tasks.events.EventLog`, …).
    :return: how many scripts were loaded.
    :raises redis.RedisError: Redis cannot be reached.
    """
    scripts = {s.sha: s.script for owner in owners for s in vars(owner).values()
               if isinstance(s, Script)}
    pipe = client.pipeline(transaction=False)
    for source in scripts.values():
        pipe.script_load(source)
    pipe.execute()
    return len(scripts)


def load_encodings(models: tuple[str, ...]) -> None:
    """Load the tiktoken encoding of each model (and the default one for none)."""
    for model in models or (None,):
        count_message_tokens([{"role": "user", "content": "warm"}], model)
