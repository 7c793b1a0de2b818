"""The providers config: which deployments serve which models, and how jobs are routed to them.

Design, simplest first: one TOML file (``SLUICE_PROVIDERS``) read once per
process into frozen dataclasses; no file means one deployment, ``default``,
built from ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` that serves every model in
``SLUICE_MODELS`` under its own name — exactly what Sluice did before
deployments existed.  The file names a key's *environment variable*, never the
key.  The state that changes (in-flight jobs, tokens this minute, cooldowns,
moving TTFT) lives in Redis (:mod:`tasks.routing`), never here.

Example file::

    [gateway]
    cooldown_s = 30          # a deployment that failed allowed_fails times rests this long
    allowed_fails = 3        # ... within fail_window_s
    fail_window_s = 60
    max_attempts = 3         # deployments tried per job (a re-try may reuse one)

    [models.llama-3-8b]
    strategy = "least-busy"  # weighted | least-busy | usage | latency | ordered
    queue = "gpu-a"          # the Celery queue its jobs run on (default SLUICE_QUEUE)
    deployments = ["vllm-a"] # optional: which of those serving it, in this order

    [deployments.vllm-a]
    base_url = "http://10.0.0.5:8000/v1"
    api_key_env = "VLLM_A_KEY"
    models = { llama-3-8b = "meta-llama/Meta-Llama-3-8B-Instruct" }
    weight = 2
    tpm = 2_000_000
    rpm = 10_000
    timeout_s = 60
    connect_timeout_s = 3
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from tasks.config import Settings, read_secret

#: Routing strategies (see :mod:`tasks.routing`).
STRATEGIES = ("weighted", "least-busy", "usage", "latency", "ordered")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ProvidersConfigError(ValueError):
    """The providers file cannot be read or holds a bad value (the message says where)."""


@dataclass(frozen=True)
class Deployment:
    """One OpenAI-compatible endpoint and the models it serves.

    ``models`` maps the alias clients ask for to the model name sent upstream.
    A limit of 0 means none.
    """

    name: str
    base_url: str
    #: The environment variable holding the deployment's API key ('' = no key).
    api_key_env: str = ""
    models: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    tpm: int = 0
    rpm: int = 0
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: Retries the SDK makes on this deployment itself before Sluice fails over.
    max_retries: int = 0
    #: The key itself, read from ``api_key_env`` when the file is loaded; never in the file.
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class ModelRoute:
    """How one model's jobs are queued and routed."""

    name: str
    strategy: str
    #: The Celery queue its jobs run on.
    queue: str
    #: The deployments serving it, in file order (the ``ordered`` strategy's order).
    deployments: tuple[str, ...]


@dataclass(frozen=True)
class Gateway:
    """Failover and cooldown settings shared by every model."""

    cooldown_s: float = 30.0
    allowed_fails: int = 3
    fail_window_s: float = 60.0
    max_attempts: int = 3
    #: First pause before re-trying a deployment already tried (doubles each time).
    backoff_s: float = 0.1
    #: How long a job waits, in all, for a deployment to come out of cooldown or limits.
    max_wait_s: float = 10.0
    #: Weight of a new TTFT sample in the moving average.
    ttft_alpha: float = 0.2
    #: ``latency``: deployments within this fraction of the fastest count as equally fast.
    latency_buffer: float = 0.5


@dataclass(frozen=True)
class Providers:
    """The whole config: deployments, models and the gateway settings."""

    deployments: Mapping[str, Deployment]
    models: Mapping[str, ModelRoute]
    gateway: Gateway = Gateway()
    source: str = "<default>"

    def route(self, model: str) -> ModelRoute | None:
        """The route of ``model``, or ``None`` when no deployment serves it."""
        return self.models.get(model)

    def queues(self) -> dict[str, str]:
        """Model -> Celery queue."""
        return {m.name: m.queue for m in self.models.values()}


def load_providers(settings: Settings) -> Providers:
    """Read ``settings.providers_file``, or build the one-deployment default without one.

    :raises ProvidersConfigError: the file is missing, not TOML, or holds a bad value.

    Example::

        providers = load_providers(Settings.from_env())
        providers.route("mock-1").strategy
    """
    path = settings.providers_file
    if not path:
        return default_providers(settings)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ProvidersConfigError(f"cannot read providers file {path!r}: {e.strerror}") from e
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProvidersConfigError(f"{path}: not valid TOML: {e}") from e
    return parse_providers(data, settings, source=path, text=text)


def default_providers(settings: Settings) -> Providers:
    """One deployment, ``default``, at ``OPENAI_BASE_URL``, serving every configured model."""
    # Named by host and port, the label the single deployment always had.
    name = urlparse(settings.openai_base_url).netloc or "default"
    dep = Deployment(name, settings.openai_base_url, api_key_env="OPENAI_API_KEY",
                     models={m: m for m in settings.model_names},
                     timeout_s=settings.provider_timeout_s,
                     max_retries=settings.provider_max_retries, api_key=settings.openai_api_key)
    models = {m: ModelRoute(m, "least-busy", settings.queue, (name,))
              for m in settings.model_names}
    return Providers({name: dep}, models)


def parse_providers(data: Mapping[str, Any], settings: Settings, source: str = "<providers>",
                    text: str = "") -> Providers:
    """Validate a parsed providers document.

    :param text: the file's text, to name the line of a bad value.
    :raises ProvidersConfigError: a value is missing, of the wrong type, or out of range.
    """
    where = _Where(source, text)
    _only(data, {"gateway", "models", "deployments"}, "", where)
    gateway = _gateway(_table(data, "gateway", "", where), where)
    deps_raw = _table(data, "deployments", "", where)
    if not deps_raw:
        raise ProvidersConfigError(f"{source}: no [deployments.NAME] table")
    deployments: dict[str, Deployment] = {}
    for name, d in deps_raw.items():
        path = f"deployments.{name}"
        if not NAME.match(name):
            raise where.error(path, "", f"bad deployment name {name!r}")
        if not isinstance(d, dict):
            raise where.error(path, "", "must be a table")
        deployments[name] = _deployment(name, d, path, where)
    serving: dict[str, list[str]] = {}
    for dep in deployments.values():
        for alias in dep.models:
            serving.setdefault(alias, []).append(dep.name)
    models_raw = _table(data, "models", "", where)
    models: dict[str, ModelRoute] = {}
    for name, m in models_raw.items():
        path = f"models.{name}"
        if not isinstance(m, dict):
            raise where.error(path, "", "must be a table")
        if name not in serving:
            raise where.error(path, "", f"no deployment serves model {name!r}")
        _only(m, {"strategy", "queue", "deployments"}, path, where)
        strategy = _get(m, "strategy", str, "least-busy", path, where)
        if strategy not in STRATEGIES:
            raise where.error(path, "strategy", f"unknown strategy {strategy!r}; one of "
                              f"{', '.join(STRATEGIES)}")
        queue = _get(m, "queue", str, settings.queue, path, where)
        if not NAME.match(queue):
            raise where.error(path, "queue", f"bad queue name {queue!r}")
        order = _get(m, "deployments", list, serving[name], path, where)
        for d in order:
            if d not in serving[name]:
                raise where.error(path, "deployments", f"deployment {d!r} does not serve "
                                  f"model {name!r}")
        models[name] = ModelRoute(name, strategy, queue, tuple(order))
    for name, deps in serving.items():
        models.setdefault(name, ModelRoute(name, "least-busy", settings.queue, tuple(deps)))
    return Providers(deployments, models, gateway, source)


def _deployment(name: str, d: Mapping[str, Any], path: str, where: _Where) -> Deployment:
    _only(d, {"base_url", "api_key_env", "models", "weight", "tpm", "rpm", "timeout_s",
              "connect_timeout_s", "max_retries"}, path, where)
    if "api_key" in d:
        raise where.error(path, "api_key", "keys never go in the file: name an environment "
                          "variable with api_key_env")
    base_url = _get(d, "base_url", str, None, path, where)
    if not base_url.startswith(("http://", "https://")):
        raise where.error(path, "base_url", f"not an http(s) URL: {base_url!r}")
    raw_models = d.get("models")
    if isinstance(raw_models, list) and all(isinstance(m, str) for m in raw_models):
        models = {m: m for m in raw_models}
    elif isinstance(raw_models, dict) and all(isinstance(v, str) for v in raw_models.values()):
        models = dict(raw_models)
    else:
        raise where.error(path, "models", "must be a list of model names or a table "
                          "alias = \"upstream model\"")
    if not models:
        raise where.error(path, "models", "serves no model")
    dep = Deployment(
        name, base_url, _get(d, "api_key_env", str, "", path, where), models,
        weight=_number(d, "weight", 1.0, path, where, positive=True),
        tpm=int(_number(d, "tpm", 0, path, where)), rpm=int(_number(d, "rpm", 0, path, where)),
        timeout_s=_number(d, "timeout_s", 60.0, path, where, positive=True),
        connect_timeout_s=_number(d, "connect_timeout_s", 5.0, path, where, positive=True),
        max_retries=int(_number(d, "max_retries", 0, path, where)))
    return replace(dep, api_key=read_secret(dep.api_key_env) if dep.api_key_env else "")


def _gateway(g: Mapping[str, Any], where: _Where) -> Gateway:
    base = Gateway()
    names = set(Gateway.__dataclass_fields__)
    _only(g, names, "gateway", where)
    values: dict[str, Any] = {k: _number(g, k, getattr(base, k), "gateway", where)
                              for k in names}
    for k in ("allowed_fails", "max_attempts"):
        if values[k] < 1:
            raise where.error("gateway", k, "must be at least 1")
        values[k] = int(values[k])
    if not 0 < values["ttft_alpha"] <= 1:
        raise where.error("gateway", "ttft_alpha", "must be in (0, 1]")
    return Gateway(**values)


class _Where:
    """Names the line of a table or field in the file's text, for error messages."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = text.splitlines()

    def error(self, table: str, key: str, message: str) -> ProvidersConfigError:
        line = self._line(table, key)
        at = f"{self.source}:{line}" if line else self.source
        name = f"{table}.{key}" if table and key else table or key
        return ProvidersConfigError(f"{at}: {name}: {message}")

    def _line(self, table: str, key: str) -> int | None:
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            re.escape(p) for p in table.split(".")) + r"\s*\]") if table else None
        inside = header is None
        for i, text in enumerate(self.lines, 1):
            if header is not None and header.match(text):
                if not key:
                    return i
                inside = True
            elif inside and text.lstrip().startswith("["):
                if header is not None:
                    break
            elif inside and key and re.match(r"^\s*" + re.escape(key) + r"\s*=", text):
                return i
        return None


def _table(data: Mapping[str, Any], key: str, path: str, where: _Where) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise where.error(path, key, "must be a table")
    return value


def _only(data: Mapping[str, Any], allowed: set[str], path: str, where: _Where) -> None:
    for key in data:
        if key not in allowed and key != "api_key":
            raise where.error(path, key, f"unknown field; expected one of {sorted(allowed)}")


def _get(data: Mapping[str, Any], key: str, kind: type, default: Any, path: str,
         where: _Where) -> Any:
    if key not in data:
        if default is None:
            raise where.error(path, key, "is required")
        return default
    value = data[key]
    if not isinstance(value, kind):
        raise where.error(path, key, f"must be a {kind.__name__}, not {value!r}")
    return value


def _number(data: Mapping[str, Any], key: str, default: float, path: str, where: _Where,
            positive: bool = False) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(path, key, f"must be a number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise where.error(path, key, f"must be {'> 0' if positive else '>= 0'}, not {value!r}")
    return float(value)
