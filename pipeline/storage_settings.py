"""Object storage and GDAL settings shared by the driver and every worker.

Credentials never pass through here: fsspec/botocore and GDAL read them from the usual environment
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or a named profile. A manifest
may name an endpoint, a region, a profile, or the environment variable that holds the endpoint; never
a secret. Nothing from this module is logged, recorded or put into the catalog except the endpoint
host, which is not a secret.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import redact

# GDAL per process: a bounded block cache and one thread per task keep memory per worker flat.
GDAL_DEFAULTS = {
    "GDAL_CACHEMAX": str(256 * 1024 * 1024),
    "GDAL_NUM_THREADS": "1",
    # TRUE, not EMPTY_DIR: no directory listing on S3, but ENVI still finds its .HDR beside the data file.
    "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(
        ext
        for e in ("tif", "tiff", "bsq", "bil", "bip", "hdr", "zip", "jp2", "xml")
        for ext in (f".{e}", f".{e.upper()}")
    ),
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "VSI_CACHE": "TRUE",
}
MIN_FETCH_PART_BYTES = 8 * 1024**2  # the floor the specification sets for a ranged GET
MAX_FETCH_SETTING = 1024**3
DEFAULT_FETCH_PART_BYTES = 16 * 1024**2
DEFAULT_FETCH_CONCURRENCY = 4
SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(ValueError):
    """Storage settings that cannot be used. Messages never carry a credential (see `redact`)."""


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def has_credentials(uri: str) -> bool:
    """True when `uri` carries user info (scheme://KEY:SECRET@host/...). A secret may hold '/' (AWS
    secrets do), so 'KEY:SE/CRET@bucket' counts too; 'bucket/a@b' (an '@' in a key) does not."""
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return False
    rest = uri[scheme.end() :]
    if "@" in rest.split("/", 1)[0]:
        return True
    before_at, at, _ = rest.partition("@")
    user, colon, _ = before_at.partition(":")
    return bool(at and colon and "/" not in user)


def refuse_credentials(uri: str) -> None:
    """Raise StorageError, without echoing the secret, when `uri` carries credentials."""
    if has_credentials(uri):
        raise StorageError(
            f"{redact(uri)}: credentials in a URI are refused (they would end up in logs and tables); "
            "give them through the AWS environment variables or a named profile"
        )


@dataclass(frozen=True, slots=True)
class StorageSettings:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local S3 server
    region: str | None = None
    profile: str | None = None  # a named AWS profile: the name only
    anonymous: bool = False  # public buckets
    # Remote products are fetched whole in ranged GETs of this size (at least 8 MiB: below it, a
    # request's latency costs more than its bytes), this many in flight (pipeline.fetch).
    fetch_part_bytes: int = DEFAULT_FETCH_PART_BYTES
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY

    KEYS = {
        "endpoint_url",
        "endpoint_url_env",
        "region",
        "profile",
        "anonymous",
        "fetch_part_bytes",
        "fetch_concurrency",
    }

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> StorageSettings:
        env = os.environ if environ is None else environ
        raw = raw or {}
        unknown = sorted(set(raw) - cls.KEYS)
        if unknown:
            raise StorageError(
                f"unknown key 'storage.{unknown[0]}' (known keys: {', '.join(sorted(cls.KEYS))})"
            )
        for key in raw:
            if any(word in key.lower() for word in ("secret", "password", "token", "key_id")):
                raise StorageError(f"'storage.{key}': credentials never go into a manifest")
        endpoint = raw.get("endpoint_url")
        if raw.get("endpoint_url_env"):
            endpoint = env.get(str(raw["endpoint_url_env"])) or endpoint
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(
                    f"'storage.endpoint_url' must be http(s)://host[:port], got {redact(repr(endpoint))}"
                )
            if parsed.username or parsed.password:
                raise StorageError("'storage.endpoint_url' must not carry credentials")
        return cls(
            endpoint_url=endpoint,
            region=raw.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            profile=raw.get("profile"),
            anonymous=bool(raw.get("anonymous", False)),
            fetch_part_bytes=_whole(raw, "fetch_part_bytes", DEFAULT_FETCH_PART_BYTES, MIN_FETCH_PART_BYTES),
            fetch_concurrency=_whole(raw, "fetch_concurrency", DEFAULT_FETCH_CONCURRENCY, 1),
        )

    def fsspec_options(self) -> dict[str, Any]:
        """storage_options for s3fs (applies to s3:// URIs only; local paths ignore them)."""
        options: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        if self.profile:
            options["profile"] = self.profile
        if self.anonymous:
            options["anon"] = True
        return options

    def gdal_config(self) -> dict[str, str]:
        """GDAL configuration for /vsis3/: endpoint, scheme and addressing; credentials come from the env."""
        config = dict(GDAL_DEFAULTS)
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            config["AWS_S3_ENDPOINT"] = parsed.netloc
            config["AWS_HTTPS"] = "YES" if parsed.scheme == "https" else "NO"
            config["AWS_VIRTUAL_HOSTING"] = "FALSE"
        if self.region:
            config["AWS_REGION"] = self.region
        if self.profile:
            config["AWS_PROFILE"] = self.profile
        if self.anonymous:
            config["AWS_NO_SIGN_REQUEST"] = "YES"
        return config


def _whole(raw: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_FETCH_SETTING:
        raise StorageError(f"'storage.{key}' must be a whole number from {low} to {MAX_FETCH_SETTING}")
    return value


def apply_gdal_config(config: Mapping[str, str]) -> None:
    """Set GDAL's configuration for this process (GDAL reads these from the environment on use)."""
    for key, value in config.items():
        os.environ[key] = value


def storage_options_for(uri: str, settings: StorageSettings) -> dict[str, Any]:
    return settings.fsspec_options() if uri.startswith("s3://") else {}


@functools.cache
def _libgdal() -> Any:
    """rasterio's own GDAL library (the wheel bundles it), for the few calls rasterio does not expose;
    None where it cannot be found (a rasterio built against a system GDAL without it on the path)."""
    import ctypes
    import glob

    import rasterio

    folder = os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs")
    found = sorted(glob.glob(os.path.join(folder, "libgdal*.so*")))
    try:
        return ctypes.CDLL(found[0] if found else "libgdal.so")
    except OSError:
        return None


def clear_gdal_network_cache() -> None:
    """Forget what GDAL's /vsicurl/ and /vsis3/ remember of remote files (existence, size, blocks), so
    a retry after an outage sees the files again instead of the failure it cached."""
    lib = _libgdal()
    if lib is not None and hasattr(lib, "VSICurlClearCache"):
        lib.VSICurlClearCache()
