"""The Providers plugin: model back ends, their keys, model listings and usage.

It contributes the built-in providers (offline, OpenAI-compatible, Anthropic, and any extra
OpenAI-compatible endpoints from config) through ``anima_model_providers``, keeps their API
keys in the store, and offers the ``models`` service (``router.ModelRouter``) that the chat
plugin runs turns through. Methods: ``anima.providers.get|set|rotate``, ``models.list``,
``usage.status``, ``usage.cost``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import trio

from kernel import (
    ADMIN,
    READ,
    WRITE,
    Call,
    ConfigSection,
    EmptyParams,
    GatewayError,
    MethodSpec,
    ModelInfo,
    ModelProvider,
    Params,
    ProviderError,
    Services,
    StoreSchema,
    conflict,
    hookimpl,
    invalid_request,
    not_found,
)

from .backends import AnthropicProvider, OfflineProvider, OpenAICompatibleProvider
from .backends.offline import OFFLINE_MODEL_ID
from .config import ProviderName, ProvidersConfig
from .keys import KEY_ID_RE, STORE_SCHEMA, KeyEntry, KeyStore, check_secret, mask
from .router import ModelRouter
from .usage import DAY_MS, MAX_DAYS, cost_report, day_start_ms, parse_range, status_windows

__all__ = ["ProvidersPlugin"]

logger = logging.getLogger(__name__)

ROTATION_STRATEGY = "on-auth-or-rate-limit"
#: Most usage rows one ``usage.*`` call adds up; past it the answer says ``truncated``.
USAGE_ROW_LIMIT = 100_000
STATUS_WINDOWS = {"24h": DAY_MS, "7d": 7 * DAY_MS, "30d": 30 * DAY_MS}

KeyId = Annotated[str, msgspec.Meta(pattern=KEY_ID_RE.pattern)]
KeyName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ProvidersGetParams(Params):
    provider: ProviderName | None = None


class ProvidersSetParams(Params):
    provider: ProviderName
    key_id: KeyId | None = None
    api_key: str | None = None
    name: KeyName | None = None
    enabled: bool | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    activate: bool = False
    remove: bool = False


class ProvidersRotateParams(Params):
    provider: ProviderName | None = None


class UsageCostParams(Params):
    start_date: str | None = None
    end_date: str | None = None
    days: Annotated[int, msgspec.Meta(ge=1, le=MAX_DAYS)] | None = None


def _without_credentials(url: str) -> str:
    """A base URL safe to show: user and password in it (``http://u:p@host``) are dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class ProvidersPlugin:
    """Model providers, keys, rotation, models and usage; one instance per gateway."""

    def __init__(self) -> None:
        self.config = ProvidersConfig()
        self.services: Services | None = None
        self.router = ModelRouter(self)
        #: Attached to the kernel's store at start-up. (A plain attribute, not a property
        #: that could raise: the kernel inspects plugin members while loading.)
        self.keys = KeyStore()
        self._loaded = trio.Event()
        self._load_error: BaseException | None = None
        self._builtins: dict[str, Any] = self._build_providers(self.config)
        self._retired: list[Any] = []
        self._in_use: Counter[int] = Counter()
        self._warned: set[str] = set()
        self._shut_down = False

    # -- declarations ----------------------------------------------------------------------

    @hookimpl
    def anima_config_section(self) -> ConfigSection:
        return ConfigSection(ProvidersConfig)

    @hookimpl
    def anima_store_schema(self) -> StoreSchema:
        return STORE_SCHEMA

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec(
                "anima.providers.get",
                self.providers_get,
                READ,
                ProvidersGetParams,
                advertised=False,
                description="providers, their keys (masked, admin only) and rotation state",
            ),
            MethodSpec(
                "anima.providers.set",
                self.providers_set,
                WRITE,
                ProvidersSetParams,
                advertised=False,
                description="add, update, enable, disable or remove a provider key",
            ),
            MethodSpec(
                "anima.providers.rotate",
                self.providers_rotate,
                WRITE,
                ProvidersRotateParams,
                advertised=False,
                description="switch a provider to its next enabled key",
            ),
            MethodSpec("models.list", self.models_list, READ, EmptyParams),
            MethodSpec("usage.status", self.usage_status, READ, EmptyParams),
            MethodSpec("usage.cost", self.usage_cost, READ, UsageCostParams),
        ]

    @hookimpl
    def anima_model_providers(self) -> list[Any]:
        return list(self._builtins.values())

    # -- lifecycle -------------------------------------------------------------------------

    @hookimpl
    def anima_startup(self, services: Services, nursery: trio.Nursery) -> None:
        self.services = services
        config = services.config.section("providers") or ProvidersConfig()
        self._replace_config(config)
        self.keys.attach(services.store)
        services.provide("models", self.router)
        nursery.start_soon(self._load_keys)

    async def _load_keys(self) -> None:
        try:
            await self.keys.load()
        except Exception as exc:
            logger.exception("provider keys could not be read from the store")
            self._load_error = exc
        finally:
            self._loaded.set()

    async def ready(self) -> None:
        """Wait until the keys are read; a failed read is a 503 for whoever needs them."""
        await self._loaded.wait()
        if self._load_error is not None:
            raise GatewayError(503, f"provider keys could not be read: {self._load_error}")

    @hookimpl
    def anima_config_changed(self, services: Services, changed: list[str]) -> None:
        if "plugins.providers" in changed:
            self._replace_config(services.config.section("providers") or ProvidersConfig())

    @hookimpl
    def anima_shutdown(self, services: Services) -> None:
        # The provider protocol has aclose called once at shutdown: the built-in ones, and
        # the third parties' ones this router drove.
        everything = {id(p): p for p in self.all_providers().values()}
        everything.update({id(p): p for p in self._builtins.values()})
        self._retired.extend(everything.values())
        self._builtins = {}
        self._shut_down = True
        self._close_idle_retired()

    # -- the providers ---------------------------------------------------------------------

    @staticmethod
    def _provider_names(config: ProvidersConfig) -> list[str]:
        names = ["offline"]
        if config.openai.enabled:
            names.append("openai")
        if config.anthropic.enabled:
            names.append("anthropic")
        names.extend(endpoint.name for endpoint in config.compatible)
        return names

    @staticmethod
    def _build_one(config: ProvidersConfig, name: str) -> Any:
        if name == "offline":
            return OfflineProvider()
        if name == "openai":
            return OpenAICompatibleProvider(
                config.openai.base_url,
                name="openai",
                display_name="OpenAI-compatible",
                needs_key=config.openai.needs_key,
                timeout_s=config.openai.timeout_s,
            )
        if name == "anthropic":
            return AnthropicProvider(
                base_url=config.anthropic.base_url, timeout_s=config.anthropic.timeout_s
            )
        endpoint = next(e for e in config.compatible if e.name == name)
        return OpenAICompatibleProvider(
            endpoint.base_url,
            name=endpoint.name,
            display_name=endpoint.display_name or f"OpenAI-compatible ({endpoint.name})",
            needs_key=endpoint.needs_key,
            timeout_s=endpoint.timeout_s,
        )

    def _build_providers(self, config: ProvidersConfig) -> dict[str, Any]:
        return {name: self._build_one(config, name) for name in self._provider_names(config)}

    def _replace_config(self, config: ProvidersConfig) -> None:
        """Use a new config; providers whose settings changed are rebuilt.

        A replaced provider may still be streaming a run, so it is closed once idle.
        """
        old_config, self.config = self.config, config
        kept: dict[str, Any] = {}
        for name in self._provider_names(config):
            current = self._builtins.get(name)
            if current is not None and _settings(old_config, name) == _settings(config, name):
                kept[name] = current
            else:
                kept[name] = self._build_one(config, name)
        kept_ids = {id(p) for p in kept.values()}
        self._retired.extend(p for p in self._builtins.values() if id(p) not in kept_ids)
        self._builtins = kept
        self._close_idle_retired()

    @contextmanager
    def using(self, provider: Any) -> Iterator[None]:
        """Mark ``provider`` busy for a stream, so a config change does not close it under it."""
        self._in_use[id(provider)] += 1
        try:
            yield
        finally:
            self._in_use[id(provider)] -= 1
            if self._in_use[id(provider)] <= 0:
                del self._in_use[id(provider)]
                self._close_idle_retired()

    def _close_idle_retired(self) -> None:
        idle = [p for p in self._retired if self._in_use.get(id(p), 0) == 0]
        if not idle:
            return
        self._retired = [p for p in self._retired if self._in_use.get(id(p), 0) > 0]
        nursery = self.services.nursery if self.services is not None else None
        if nursery is not None:
            nursery.start_soon(_close_providers, idle)

    def all_providers(self) -> dict[str, ModelProvider]:
        """Built-in providers, then every third party's, by name (the first of a name wins)."""
        providers: dict[str, ModelProvider] = dict(self._builtins)
        if self.services is None or self._shut_down:
            return providers
        own = {id(p) for p in self._builtins.values()}
        try:
            contributed = self.services.hook.anima_model_providers()
        except Exception:
            logger.exception("a plugin's anima_model_providers raised; its providers are skipped")
            return providers
        for batch in contributed:
            for provider in batch or ():
                if id(provider) in own:
                    continue
                name = getattr(provider, "name", None)
                if not isinstance(name, str) or not _looks_like_provider(provider):
                    self._warn_once(
                        f"bad:{name}", "ignoring a model provider that is not a ModelProvider"
                    )
                    continue
                if name in providers:
                    self._warn_once(
                        f"dup:{name}", f"model provider {name!r} is contributed twice; first wins"
                    )
                    continue
                providers[name] = provider
        return providers

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s", message)

    def configured_model(self, provider: str) -> str | None:
        config = self.config
        if provider == "offline":
            return OFFLINE_MODEL_ID
        if provider == "openai":
            return config.openai.model
        if provider == "anthropic":
            return config.anthropic.model
        for endpoint in config.compatible:
            if endpoint.name == provider:
                return endpoint.model
        return None

    def now_ms(self) -> int:
        assert self.services is not None
        return self.services.clock.now_ms()

    # -- describing ------------------------------------------------------------------------

    def _kind(self, name: str, provider: Any) -> str:
        if name in self._builtins:
            if isinstance(provider, OfflineProvider):
                return "offline"
            if isinstance(provider, AnthropicProvider):
                return "anthropic"
            return "openai-compatible"
        return "plugin"

    def _describe_key(self, key: KeyEntry, *, active: bool, admin: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": key.key_id,
            "name": key.name,
            "enabled": key.enabled,
            "priority": key.priority,
            "active": active,
            "status": "failing" if key.last_error else "ok",
            "lastErrorAt": key.last_error_at,
            "updatedAt": key.updated_at,
        }
        if admin:
            # Key material, even masked, is for admins only.
            entry["apiKey"] = mask(key.secret)
            entry["lastError"] = key.last_error
            entry["createdAt"] = key.created_at
        return entry

    def _describe(self, name: str, provider: Any, *, admin: bool) -> dict[str, Any]:
        keys = self.keys.keys(name)
        active = self.keys.active(name)
        described: dict[str, Any] = {
            "id": name,
            "name": getattr(provider, "display_name", name),
            "kind": self._kind(name, provider),
            "needsKey": bool(provider.needs_key),
            "model": self.router.default_model(name),
            "usable": not provider.needs_key or active is not None,
            "keyCount": len(keys),
            "enabledKeyCount": sum(1 for k in keys if k.enabled),
            "activeKeyId": active.key_id if active else None,
            "keys": [
                self._describe_key(
                    k, active=active is not None and k.key_id == active.key_id, admin=admin
                )
                for k in keys
            ],
        }
        base_url = getattr(provider, "base_url", None)
        if isinstance(base_url, str):
            described["baseUrl"] = _without_credentials(base_url)
        return described

    def _provider_or_error(self, name: str) -> Any:
        provider = self.all_providers().get(name)
        if provider is None:
            known = ", ".join(sorted(self.all_providers()))
            raise not_found(
                f"unknown provider {name!r} (known: {known})", details={"field": "provider"}
            )
        return provider

    # -- methods: keys ---------------------------------------------------------------------

    async def providers_get(self, call: Call, params: ProvidersGetParams) -> dict[str, Any]:
        await self.ready()
        admin = ADMIN in call.connection.scopes
        providers = self.all_providers()
        if params.provider is not None:
            providers = {params.provider: self._provider_or_error(params.provider)}
        default, reason = self.router.default_choice()
        return {
            "providers": [self._describe(n, p, admin=admin) for n, p in providers.items()],
            "defaultProvider": default,
            "defaultModel": self.router.default_model(default),
            "defaultReason": reason,
            "activeProvider": default,
            "autoRotation": self.config.auto_rotate,
            "rotationStrategy": ROTATION_STRATEGY,
        }

    async def providers_set(self, call: Call, params: ProvidersSetParams) -> dict[str, Any]:
        await self.ready()
        provider = self._provider_or_error(params.provider)
        if not provider.needs_key and params.provider == "offline":
            raise invalid_request("the offline provider takes no key", field="provider")
        keys, now = self.keys, self.now_ms()
        secret = check_secret(params.api_key) if params.api_key is not None else None
        existing = keys.get(params.key_id) if params.key_id is not None else None
        if existing is not None and existing.provider != params.provider:
            raise invalid_request(
                f"key {existing.key_id} belongs to provider {existing.provider}", field="keyId"
            )

        removed = False
        if params.remove:
            changes = (params.api_key, params.name, params.enabled, params.priority)
            if any(v is not None for v in changes) or params.activate:
                raise invalid_request(
                    "remove cannot be combined with other changes", field="remove"
                )
            if existing is None:
                raise not_found(
                    f"provider {params.provider} has no key {params.key_id!r}",
                    details={"field": "keyId"},
                )
            await keys.remove(existing.key_id)
            entry, removed = existing, True
        elif existing is None:
            if secret is None:
                if params.key_id is not None:
                    raise not_found(
                        f"provider {params.provider} has no key {params.key_id!r};"
                        " give apiKey to add it",
                        details={"field": "keyId"},
                    )
                raise invalid_request("apiKey is required to add a key", field="apiKey")
            duplicate = next((k for k in keys.keys(params.provider) if k.secret == secret), None)
            if duplicate is not None:
                raise conflict(
                    f"this key is already stored as {duplicate.key_id}",
                    details={"keyId": duplicate.key_id},
                )
            entry = await keys.add(
                params.provider,
                secret,
                key_id=params.key_id,
                name=params.name,
                enabled=True if params.enabled is None else params.enabled,
                priority=params.priority,
                now_ms=now,
            )
        else:
            changes = (secret, params.name, params.enabled, params.priority)
            if all(v is None for v in changes) and not params.activate:
                raise invalid_request(
                    "nothing to change: give apiKey, name, enabled, priority, activate or remove",
                    field="keyId",
                )
            entry = existing
            if any(v is not None for v in changes):
                entry = await keys.update(
                    existing.key_id,
                    secret=secret,
                    name=params.name,
                    enabled=params.enabled,
                    priority=params.priority,
                    now_ms=now,
                )

        if params.activate:
            if not entry.enabled:
                raise conflict(f"key {entry.key_id} is disabled; enable it to make it active")
            await keys.activate(params.provider, entry.key_id, now_ms=now)

        active = keys.active(params.provider)
        admin = ADMIN in call.connection.scopes
        return {
            "ok": True,
            "provider": params.provider,
            "removed": removed,
            "key": self._describe_key(
                entry, active=active is not None and active.key_id == entry.key_id, admin=admin
            ),
            "activeKeyId": active.key_id if active else None,
            "keyCount": len(keys.keys(params.provider)),
        }

    async def providers_rotate(self, call: Call, params: ProvidersRotateParams) -> dict[str, Any]:
        await self.ready()
        name = params.provider
        if name is None:
            name, _reason = self.router.default_choice()
        provider = self._provider_or_error(name)
        if not provider.needs_key and not self.keys.keys(name):
            raise invalid_request(
                f"provider {name} uses no keys; nothing to rotate", field="provider"
            )
        previous, current = await self.keys.rotate(name, now_ms=self.now_ms())
        if current is None:
            raise conflict(
                f"provider {name} has no enabled key to rotate to; add one with"
                " anima.providers.set",
                details={"provider": name},
            )
        rotated = previous is None or previous.key_id != current.key_id
        result: dict[str, Any] = {
            "ok": True,
            "provider": name,
            "rotated": rotated,
            "previousKeyId": previous.key_id if previous else None,
            "activeKeyId": current.key_id,
            "autoRotation": self.config.auto_rotate,
            "rotationStrategy": ROTATION_STRATEGY,
        }
        if not rotated:
            result["reason"] = "only one enabled key"
        return result

    # -- methods: models -------------------------------------------------------------------

    async def models_list(self, call: Call, params: EmptyParams) -> dict[str, Any]:
        await self.ready()
        providers = self.all_providers()
        reports: dict[str, dict[str, Any]] = {}
        listed: dict[str, list[ModelInfo]] = {}

        async def list_one(name: str, provider: Any) -> None:
            report: dict[str, Any] = {"provider": name, "displayName": provider.display_name}
            reports[name] = report
            key = self.keys.active(name)
            if provider.needs_key and key is None:
                report.update(ok=False, skipped=True, error="no API key configured")
                return
            try:
                with trio.fail_after(self.config.models_timeout_s):
                    models = await provider.list_models(key.secret if key else None)
                listed[name] = [_as_model_info(m, name) for m in models]
                report.update(ok=True, count=len(listed[name]))
            except ProviderError as exc:
                report.update(ok=False, error=exc.message, errorKind=exc.kind)
            except trio.TooSlowError:
                report.update(
                    ok=False,
                    error=f"no model list within {self.config.models_timeout_s} s",
                    errorKind="unreachable",
                )
            except Exception as exc:
                # A third party's provider must not break the listing for the others.
                logger.exception("provider %s: list_models failed", name)
                report.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            if not report["ok"]:
                configured = self.configured_model(name)
                if configured:
                    # The server has no listing (or it failed): still show what runs will ask.
                    listed[name] = [ModelInfo(id=configured, name=configured, provider=name)]
                    report["fallback"] = "configured model"

        async with trio.open_nursery() as nursery:
            for name, provider in providers.items():
                nursery.start_soon(list_one, name, provider)

        default, _reason = self.router.default_choice()
        models = [model for name in providers for model in listed.get(name, [])]
        return {
            "models": models,
            "providers": [reports[name] for name in providers],
            "defaultProvider": default,
            "defaultModel": self.router.default_model(default),
        }

    # -- methods: usage --------------------------------------------------------------------

    async def _usage_rows(self, call: Call, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        sessions = call.services.lookup("sessions")
        return await sessions.usage_rows(start_ms=start_ms, end_ms=end_ms, limit=USAGE_ROW_LIMIT)

    async def usage_status(self, call: Call, params: EmptyParams) -> dict[str, Any]:
        await self.ready()
        now = self.now_ms()
        longest = max(STATUS_WINDOWS.values())
        rows = await self._usage_rows(call, now - longest, now + 1)
        windows = status_windows(rows, now_ms=now, windows=STATUS_WINDOWS)
        providers = self.all_providers()
        names = list(providers) + sorted(set(windows) - set(providers))
        entries = []
        for name in names:
            provider = providers.get(name)
            active = self.keys.active(name)
            counts = windows.get(name, {})
            entry: dict[str, Any] = {
                "provider": name,
                "displayName": provider.display_name if provider else name,
                "windows": [
                    {
                        "label": label,
                        **counts.get(label, {"inputTokens": 0, "outputTokens": 0, "runs": 0}),
                    }
                    for label in STATUS_WINDOWS
                ],
                "keys": {
                    "count": len(self.keys.keys(name)),
                    "enabled": sum(1 for k in self.keys.keys(name) if k.enabled),
                    "activeKeyId": active.key_id if active else None,
                },
            }
            if provider is None:
                entry["error"] = "provider no longer configured"
            elif active is not None and active.last_error:
                entry["error"] = active.last_error
            entries.append(entry)
        return {
            "updatedAt": now,
            "providers": entries,
            "truncated": len(rows) >= USAGE_ROW_LIMIT,
        }

    async def usage_cost(self, call: Call, params: UsageCostParams) -> dict[str, Any]:
        now = self.now_ms()
        today = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date()
        first, last = parse_range(params.start_date, params.end_date, params.days, today=today)
        rows = await self._usage_rows(
            call, day_start_ms(first), day_start_ms(last + dt.timedelta(days=1))
        )
        report = cost_report(rows, self.config.prices, first=first, last=last)
        return {
            "updatedAt": now,
            "currency": self.config.currency,
            **report,
            "truncated": len(rows) >= USAGE_ROW_LIMIT,
        }


def _looks_like_provider(provider: Any) -> bool:
    """``ModelProvider`` without insisting on ``aclose``, which a simple provider may lack."""
    return (
        isinstance(getattr(provider, "display_name", None), str)
        and isinstance(getattr(provider, "needs_key", None), bool)
        and callable(getattr(provider, "stream", None))
        and callable(getattr(provider, "list_models", None))
    )


def _settings(config: ProvidersConfig, name: str) -> Any:
    """What a built-in provider object is built from; equal settings keep the object."""
    if name == "openai":
        return msgspec.structs.replace(config.openai, model="")
    if name == "anthropic":
        return msgspec.structs.replace(config.anthropic, model="")
    for endpoint in config.compatible:
        if endpoint.name == name:
            return msgspec.structs.replace(endpoint, model="")
    return name


def _as_model_info(model: Any, provider: str) -> ModelInfo:
    if isinstance(model, ModelInfo):
        return model
    # A third party may hand back dicts; take what fits.
    if isinstance(model, Mapping) and isinstance(model.get("id"), str):
        return ModelInfo(
            id=model["id"], name=str(model.get("name") or model["id"]), provider=provider
        )
    raise TypeError(f"list_models returned {type(model).__name__}, not ModelInfo")


async def _close_providers(providers: list[Any]) -> None:
    # Shielded: this also runs at shutdown, when the background nursery is being cancelled.
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        for provider in providers:
            close = getattr(provider, "aclose", None)
            if close is None:
                continue
            try:
                await close()
            except Exception:
                logger.exception("closing model provider %s failed", getattr(provider, "name", "?"))
