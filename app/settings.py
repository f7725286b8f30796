"""Settings: one frozen object read from the environment and `.env`, built once per entrypoint."""

import base64
import binascii
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster")
ClaimOrder = Literal["longest", "oldest", "random"]
PoisonPolicy = Literal["skip", "park"]


class Settings(BaseSettings):
    """Every knob of evq; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_file=".env", frozen=True, extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A file holding the Redis password, for a URL without one (the Docker stack's).
    redis_password_file: Path | None = None
    namespace: str = Field(
        "evq", min_length=1, validation_alias=AliasChoices("EVQ_NAMESPACE", "namespace")
    )
    shards: int = Field(16, ge=1, le=16_384)
    concurrency: int = Field(500, ge=1, le=10_000)
    process_seconds: float = Field(1.0, ge=0)
    lease_seconds: float = Field(30.0, ge=1)  # renewed every third: shorter is not safe
    max_attempts: int = Field(5, ge=1)
    dead_letters_max: int = Field(10_000, ge=1)
    max_backlog_per_account: int | None = Field(None, ge=1)
    poison_policy: PoisonPolicy = "skip"
    handler_timeout_seconds: float | None = Field(None, gt=0)
    fail_rate: float = Field(0.0, ge=0, le=1)
    handler: str = "app.handlers:reference"
    event_log: Path = Path("var/log/event.log")
    event_log_max_bytes: int | None = Field(256 * 1024 * 1024, ge=64 * 1024)
    event_log_keep: int = Field(8, ge=1)
    claim_order: ClaimOrder = "longest"
    switch_margin: int = Field(3, ge=1)
    batch_max: int = Field(50, ge=1, le=1000)
    dedupe_seconds: float = Field(86_400.0, gt=0)
    account_idle_seconds: float = Field(3 * 86_400.0, gt=0)
    reaper_seconds: float = Field(5.0, gt=0)
    retry_backoff_seconds: float = Field(0.1, ge=0)
    retry_backoff_max_seconds: float = Field(10.0, ge=0)
    claim_block_seconds: float = Field(1.0, gt=0)
    replica_acks: int = Field(0, ge=0, le=16)
    redis_timeout_seconds: float | None = Field(None, gt=0)
    allow_eviction: bool = Field(
        False, validation_alias=AliasChoices("EVQ_ALLOW_EVICTION", "allow_eviction")
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65_535)
    api_token: SecretStr | None = None
    # A file holding the token, read when API_TOKEN is unset (the Docker image makes one).
    api_token_file: Path | None = None
    api_allow_no_token: bool = False
    allowed_hosts: str = ""  # comma-separated Host names served besides loopback and API_HOST
    allowed_origins: str = ""  # comma-separated origins allowed besides the API's own
    api_header_timeout_seconds: float = Field(5.0, gt=0, le=300)
    ws_max_unacked: int = Field(5000, ge=1, le=1_000_000)
    ws_max_unacked_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    # HANDLER=app.handlers:http: where each event is POSTed ({account_id} is replaced), the
    # Standard Webhooks secrets (whsec_..., space-separated while rotating), how long one
    # delivery may take (default: 10 s or half the lease, whichever is shorter), and how many
    # connections to one host (default: CONCURRENCY).
    delivery_url: str | None = None
    delivery_secret: SecretStr | None = None
    delivery_timeout_seconds: float | None = Field(None, gt=0)
    delivery_max_connections: int | None = Field(None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _timeout_fits_the_lease(self) -> "Settings":
        if self.redis_timeout_seconds is not None and (
            self.redis_timeout_seconds > self.lease_seconds / 2
        ):
            raise ValueError(
                f"REDIS_TIMEOUT_SECONDS ({self.redis_timeout_seconds:g}) must be at most half of"
                f" LEASE_SECONDS ({self.lease_seconds:g}), so a consumer can retry a call"
                " that timed out before its lease runs out"
            )
        return self

    @model_validator(mode="after")
    def _delivery_fits_the_lease(self) -> "Settings":
        timeout = self.delivery_timeout_seconds
        if timeout is not None and timeout >= self.lease_seconds:
            raise ValueError(
                f"DELIVERY_TIMEOUT_SECONDS ({self.delivery_timeout_seconds:g}) must be shorter"
                f" than LEASE_SECONDS ({self.lease_seconds:g})"
            )
        return self

    @model_validator(mode="after")
    def _idle_outlasts_dedupe(self) -> "Settings":
        if self.account_idle_seconds < self.dedupe_seconds:
            raise ValueError(
                f"ACCOUNT_IDLE_SECONDS ({self.account_idle_seconds:g}) must be at least"
                f" DEDUPE_SECONDS ({self.dedupe_seconds:g}): an idle account is forgotten no"
                " sooner than the event ids it accepted"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, url: str) -> str:
        """redis://, rediss://, unix:// or redis+cluster:// with host:port pairs; a database
        given as a path must be a number."""
        scheme, found, rest = url.partition("://")
        if not found or scheme not in URL_SCHEMES:
            raise ValueError(f"must start with {', '.join(s + '://' for s in URL_SCHEMES)}")
        address, _, path = rest.partition("?")[0].rpartition("@")[2].partition("/")
        if scheme == "unix":
            return url
        if not address:
            raise ValueError("names no host")
        if scheme == "redis+cluster":
            for pair in address.split(","):
                host, _, port = pair.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"redis+cluster:// takes host:port pairs, not {pair!r}")
        elif path and not path.isdigit():
            raise ValueError(f"the database after the host must be a number, not {path!r}")
        return url

    @field_validator("max_backlog_per_account", mode="before")
    @classmethod
    def _blank_is_no_cap(cls, cap: object) -> object:
        return None if isinstance(cap, str) and not cap.strip() else cap  # docker-compose's ""

    @field_validator(
        "delivery_url",
        "delivery_secret",
        "delivery_timeout_seconds",
        "delivery_max_connections",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("delivery_url")
    @classmethod
    def _a_delivery_url(cls, url: str | None) -> str | None:
        """http:// or https:// with a host; `{account_id}` is the only placeholder."""
        if url is None:
            return None
        parts = urlsplit(url.replace("{account_id}", "0"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if "{" in url.replace("{account_id}", ""):
            raise ValueError("{account_id} is the only placeholder it may hold")
        return url

    @field_validator("delivery_secret", mode="after")
    @classmethod
    def _whsec_secrets(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            for each in secret.get_secret_value().split():
                webhook_key(each)
        return secret

    @property
    def delivery_timeout_s(self) -> float:
        """How long one delivery may take, waiting for a connection included."""
        return self.delivery_timeout_seconds or min(10.0, self.lease_seconds / 2)

    @property
    def delivery_keys(self) -> list[bytes]:
        """The keys of DELIVERY_SECRET's secrets, each delivery signed with every one."""
        if self.delivery_secret is None:
            return []
        return [webhook_key(each) for each in self.delivery_secret.get_secret_value().split()]

    @field_validator("api_token", mode="after")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            return None  # API_TOKEN= in a .env: no token, as when it is unset
        return token

    @field_validator("redis_password_file", mode="after")
    @classmethod
    def _password_file_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{path} cannot be read")
        return path

    @property
    def redis_password(self) -> str | None:
        """The password of REDIS_PASSWORD_FILE, when one is named."""
        if self.redis_password_file is None:
            return None
        return self.redis_password_file.read_text().strip()

    @field_validator("api_token_file", mode="before")
    @classmethod
    def _blank_is_no_file(cls, path: object) -> object:
        return None if isinstance(path, str) and not path.strip() else path

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, values: Any) -> Any:
        """API_TOKEN_FILE stands in for API_TOKEN when that is unset and the file exists."""
        if not isinstance(values, dict) or str(values.get("api_token") or "").strip():
            return values
        path = str(values.get("api_token_file") or "").strip()
        if not path:
            return values
        try:
            token = Path(path).read_text().strip()
        except FileNotFoundError:
            return values
        except OSError as exc:
            raise ValueError(f"API_TOKEN_FILE {path} cannot be read: {exc.strerror}") from None
        return {**values, "api_token": token} if token else values

    @property
    def api_hosts(self) -> frozenset[str]:
        """The Host names the API answers: loopback, API_HOST unless it is a wildcard, and
        ALLOWED_HOSTS (`*` there: any)."""
        named = {h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()}
        if self.api_host not in ("0.0.0.0", "::", ""):
            named.add(self.api_host.lower())
        return frozenset({"localhost", "127.0.0.1", "::1", *named})

    @property
    def api_origins(self) -> frozenset[str]:
        """Origins allowed to change state or open a stream besides the API's own."""
        return frozenset(
            o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()
        )

    @property
    def socket_timeout_s(self) -> float:
        """How long one Redis call may take: REDIS_TIMEOUT_SECONDS, else 5 s or a third of the
        lease, whichever is shorter."""
        return self.redis_timeout_seconds or min(5.0, self.lease_seconds / 3)

    @property
    def claim_block_s(self) -> float:
        """How long an idle claimer blocks: CLAIM_BLOCK_SECONDS, but at most half the socket
        timeout, so a blocking pop is never mistaken for a dead connection."""
        return min(self.claim_block_seconds, self.socket_timeout_s / 2)

    @property
    def lease_ms(self) -> int:
        """The lease in milliseconds, as the scripts take it."""
        return max(1, round(self.lease_seconds * 1000))

    @property
    def account_idle_ms(self) -> int:
        """ACCOUNT_IDLE_SECONDS in milliseconds, as the scripts take it."""
        return max(1, round(self.account_idle_seconds * 1000))

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before retrying an event that failed its `attempt`-th try."""
        return float(
            min(self.retry_backoff_seconds * 2 ** (attempt - 1), self.retry_backoff_max_seconds)
        )


def webhook_key(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: `whsec_` and base64 (at least 16 bytes)."""
    if not secret.startswith("whsec_"):
        raise ValueError("each secret takes the form whsec_<base64>")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a secret after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("a secret must hold at least 16 bytes (24 base64 characters)")
    return key
