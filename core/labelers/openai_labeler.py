"""LLM labeling through any OpenAI-compatible chat endpoint, with our own retries and budget.

The client's built-in retries are off (`max_retries=0`) so that every HTTP attempt goes through
one place, `ChatClient.chat_json`: it enforces the call/token budget before sending, bounds the
number of requests in flight, retries 429/5xx/timeouts/connection errors with exponential
backoff and full jitter (honouring Retry-After), and books calls and tokens from `usage` into
`LabelerStats`. Persona generation uses the same helper, so both spend from the same accounts.
The API key is never logged and is hidden from `repr`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from core.labelers.base import LabelerStats, LabelResult, UserHistory
from core.labelers.prompts import ReplyParseError, label_messages, parse_json_reply, parse_personas
from core.personas import PersonaSet
from core.settings import check_all, check_settings, read_env, setting

__all__ = ["LLMConfig", "LLMError", "BudgetExhausted", "ChatClient", "OpenAILabeler", "check_endpoint"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _unset_or_positive(value: int | None) -> bool:
    return value is None or value >= 0


@dataclass(frozen=True)
class LLMConfig:
    """Endpoint, model, limits and budget of the LLM labeler (read once from the environment).

    `max_calls` / `max_tokens` are the whole budget (None = unlimited); `reply_tokens` caps each
    completion. `backoff_s` is the first retry delay, doubled per attempt up to `backoff_max_s`.
    """

    base_url: str = setting("https://api.openai.com/v1", "OPENAI_BASE_URL",
                            "any OpenAI-compatible chat-completions endpoint")
    api_key: str = setting("", "OPENAI_API_KEY", "the key; read from the environment only, never logged or "
                           "shown in `repr`", secret=True)
    model: str = setting("gpt-4o-mini", "GPLR_LLM_MODEL", "model name as the endpoint knows it")
    timeout_s: float = setting(30.0, "GPLR_LLM_TIMEOUT_S", "per-request timeout, seconds",
                               parse=float, check=lambda v: v > 0, why="must be > 0")
    max_retries: int = setting(4, "GPLR_LLM_MAX_RETRIES", "retries of 429/5xx/timeouts/connection errors "
                               "(exponential backoff, full jitter, Retry-After honoured)",
                               parse=int, check=lambda v: v >= 0, why="must be >= 0")
    backoff_s: float = setting(0.5, "GPLR_LLM_BACKOFF_S", "first retry delay, doubled per attempt",
                               parse=float, check=lambda v: v >= 0, why="must be >= 0")
    concurrency: int = setting(4, "GPLR_LLM_CONCURRENCY", "requests in flight at once",
                               parse=int, check=lambda v: v >= 1, why="must be >= 1")
    max_calls: int | None = setting(None, "GPLR_LLM_MAX_CALLS", "hard cap on calls per process (unset = only "
                                    "`GPLR_LABEL_BUDGET` limits)", parse=int, check=_unset_or_positive,
                                    why="must be >= 0")
    max_tokens: int | None = setting(None, "GPLR_LLM_MAX_TOKENS", "hard cap on tokens per process",
                                     parse=int, check=_unset_or_positive, why="must be >= 0")
    reply_tokens: int = 200
    backoff_max_s: float = 20.0
    max_personas: int = 5
    history_tokens: int = 1500
    temperature: float = 0.0

    def __post_init__(self) -> None:
        check_settings(self)
        check_all([(self.max_personas >= 1, "max_personas", self.max_personas, "must be >= 1"),
                   (self.reply_tokens >= 1, "reply_tokens", self.reply_tokens, "must be >= 1")])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LLMConfig:
        """The declared variables above (OPENAI_BASE_URL, OPENAI_API_KEY, GPLR_LLM_*); `overrides`
        replace fields after reading. A bad value raises `ConfigError` naming its variable."""
        values = read_env(cls, os.environ if env is None else env)
        values.update(overrides)
        return cls(**values)


class LLMError(RuntimeError):
    """A call that failed for good; `kind` becomes `LabelResult.error`."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class BudgetExhausted(LLMError):
    def __init__(self) -> None:
        super().__init__("budget_exhausted")


DEFAULT_BASE_URL = LLMConfig.base_url


def check_endpoint(config: LLMConfig, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URL, when the endpoint cannot answer (a command would otherwise
    spend minutes in retries and label nobody). One GET of `/models`: any HTTP answer but
    401/403 counts as reachable, since local servers often lack that route.
    Raises LLMError("no_api_key" | "unauthorized" | "unreachable")."""
    import httpx

    url = config.base_url.rstrip("/") + "/models"
    if not config.api_key and config.base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise LLMError("no_api_key", f"OPENAI_API_KEY is unset (endpoint {config.base_url}); set it, or "
                                     "point OPENAI_BASE_URL at an OpenAI-compatible server")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        status = httpx.get(url, headers=headers, timeout=timeout_s).status_code
    except httpx.HTTPError as exc:
        raise LLMError("unreachable", f"no answer from {config.base_url} within {timeout_s:g}s "
                                      f"({type(exc).__name__}); check OPENAI_BASE_URL") from None
    if status in (401, 403):
        why = "OPENAI_API_KEY is unset" if not config.api_key else "OPENAI_API_KEY was refused"
        raise LLMError("unauthorized", f"{config.base_url} answered HTTP {status}: {why}")


def _retry_kind(exc: Exception) -> str | None:
    """Error kind if `exc` is worth retrying, else None."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return "server_error"
    return None


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    raw = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


class ChatClient:
    """One budgeted, bounded, retrying JSON chat helper over an `openai.OpenAI` client."""

    def __init__(self, config: LLMConfig, stats: LabelerStats | None = None, seed: int | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else LabelerStats()
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "not-set",
            timeout=config.timeout_s,
            max_retries=0,
        )
        self._slots = threading.BoundedSemaphore(config.concurrency)
        self._budget_lock = threading.Lock()
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def _reserve_call(self) -> None:
        """Count one call if the budget allows it; raise BudgetExhausted otherwise (no call made)."""
        cfg, st = self.config, self.stats
        with self._budget_lock:
            if cfg.max_calls is not None and st.calls >= cfg.max_calls:
                raise BudgetExhausted()
            if cfg.max_tokens is not None and st.prompt_tokens + st.completion_tokens >= cfg.max_tokens:
                raise BudgetExhausted()
            st.add(calls=1)

    def _backoff(self, attempt: int, exc: Exception) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_s * 2**attempt)
        delay = self._rng.uniform(0.0, cap)
        hinted = _retry_after(exc)
        if hinted is not None:
            delay = max(delay, min(hinted, self.config.backoff_max_s))
        return delay

    def _send(self, messages: Sequence[Mapping[str, str]], reply_tokens: int | None) -> str:
        with self._slots:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=list(messages),  # type: ignore[arg-type]
                temperature=self.config.temperature,
                max_tokens=reply_tokens or self.config.reply_tokens,
            )
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.stats.add(prompt_tokens=int(usage.prompt_tokens or 0),
                           completion_tokens=int(usage.completion_tokens or 0))
        if not response.choices:
            raise ReplyParseError("reply has no choices")
        return response.choices[0].message.content or ""

    def chat_json(
        self, messages: Sequence[Mapping[str, str]], parse: Callable[[str], T], reply_tokens: int | None = None
    ) -> T:
        """Send `messages`, retrying transient failures, and return `parse(reply text)`.

        `reply_tokens` overrides the configured completion cap (long answers such as a whole
        persona set).
        Raises BudgetExhausted before any call over budget, LLMError(kind) when retries run
        out or the request is refused, and ReplyParseError when `parse` rejects the reply.
        """
        for attempt in range(self.config.max_retries + 1):
            self._reserve_call()
            try:
                text = self._send(messages, reply_tokens)
            except openai.APIError as exc:
                kind = _retry_kind(exc)
                if kind is None:
                    status = getattr(exc, "status_code", "")
                    raise LLMError("api_error", f"{type(exc).__name__} {status}".strip()) from None
                if attempt == self.config.max_retries:
                    raise LLMError(kind, f"gave up after {attempt + 1} attempts") from None
                delay = self._backoff(attempt, exc)
                log.info("LLM %s (attempt %d), retrying in %.2fs", kind, attempt + 1, delay)
                self.stats.add(retries=1)
                time.sleep(delay)
                continue
            return parse(text)
        raise AssertionError("unreachable")  # pragma: no cover


def _at_most(text: str, max_personas: int) -> str:
    """`text` unchanged, unless it lists more than `max_personas` names: a malformed reply
    (rejected, not truncated: a 50-name list is not an answer to "at most 5")."""
    value = parse_json_reply(text)
    names = value.get("personas") if isinstance(value, dict) else None
    if isinstance(names, list) and len(names) > max_personas:
        raise ReplyParseError(f"reply lists {len(names)} personas, more than {max_personas}")
    return text


class OpenAILabeler:
    """Labels users by asking the LLM to pick personas from the set (paper's prototype oracle).

    >>> from core.personas import Persona
    >>> cfg = LLMConfig(base_url="http://127.0.0.1:9/v1", api_key="sk-secret")
    >>> "sk-secret" in repr(OpenAILabeler(PersonaSet([Persona("A", "")]), cfg))
    False
    """

    name = "openai"

    def __init__(self, personas: PersonaSet, config: LLMConfig | None = None, seed: int | None = None) -> None:
        self.personas = personas
        self.config = config if config is not None else LLMConfig.from_env()
        self.stats = LabelerStats()
        self.chat = ChatClient(self.config, self.stats, seed)

    def __repr__(self) -> str:
        return f"OpenAILabeler(n_personas={len(self.personas)}, config={self.config!r})"

    def label_one(self, history: UserHistory) -> LabelResult:
        """Ask for one user's personas; failures become a result with `error`, never an exception."""
        cfg = self.config
        messages = label_messages(history, self.personas, cfg.max_personas, cfg.history_tokens)
        try:
            indices, dropped = self.chat.chat_json(
                messages, lambda text: parse_personas(_at_most(text, cfg.max_personas), self.personas,
                                                      cfg.max_personas)
            )
        except ReplyParseError as exc:
            log.warning("unparseable LLM reply for user %s: %s", history.user_id, exc)
            return self._failed(history, "parse_error")
        except LLMError as exc:
            if exc.kind != "budget_exhausted":
                log.warning("LLM call failed for user %s: %s", history.user_id, exc)
            return self._failed(history, exc.kind)
        if dropped:
            self.stats.add(dropped_personas=len(dropped))
        if not indices:
            return self._failed(history, "no_known_personas", dropped)
        return LabelResult(history.user_id, indices, dropped=dropped)

    def _failed(self, history: UserHistory, kind: str, dropped: tuple[str, ...] = ()) -> LabelResult:
        self.stats.add(errors=1)
        return LabelResult(history.user_id, (), dropped=dropped, error=kind)

    def label(self, histories: Sequence[UserHistory]) -> list[LabelResult]:
        """Label all histories, at most `config.concurrency` requests in flight; order kept."""
        if len(histories) <= 1:
            return [self.label_one(h) for h in histories]
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="llm-label") as pool:
            return list(pool.map(self.label_one, histories))
