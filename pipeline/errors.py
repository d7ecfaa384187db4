"""What can go wrong, by kind: a property of a product (rejected, one line) or of the environment
(transient: retried, and if it persists the stage fails; never recorded as a rejection).

The classification lives here, once, so every stage and the stage engine agree on it. `redact` removes
credentials from any text before a user (or a table) sees it.
"""

from __future__ import annotations

import errno
import re

# errno values that say "the environment failed", not "the product is bad".
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EROFS,
        errno.ESTALE,
    }
)

# Words in messages of GDAL (curl), botocore, aiobotocore and aiohttp that mean a network or service
# fault rather than bad bytes.
_TRANSIENT_TEXT = re.compile(
    r"curl error|HTTP response code: ?(?:5\d\d|429|408|403|401)|Connection (?:refused|reset|aborted)|"
    r"Could not connect|Cannot connect|timed? ?out|Timeout|ServiceUnavailable|SlowDown|Throttl|"
    r"InternalError|RequestTimeout|Remote end closed|EndpointConnectionError|ConnectionClosed|"
    r"Server disconnected|Broken pipe|No space left|Permission denied|Access Denied|AccessDenied|"
    r"InvalidAccessKeyId|ExpiredToken|Read-only file system|Disk quota",
    re.IGNORECASE,
)
_TRANSIENT_TYPES = (
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "KilledWorker",
    "CommError",
    "TimeoutError",
    "CancelledError",
)


class TransientError(RuntimeError):
    """A fault of the environment (network, timeout, permission, disk full, a lost worker)."""


class BuildFault(RuntimeError):
    """A build file (an earlier stage's output) that is missing or corrupt: never a product's rejection.
    The stage fails at once, naming the stage to rerun; that stage redoes the item, since its outputs are
    validated before they are trusted."""


class InternalError(RuntimeError):
    """A fault of the code, not of the product (see `is_code_fault`): the stage fails naming it, and no
    product is rejected for it; a rerun with the fixed code resumes."""


class StageFailed(RuntimeError):
    """A stage that could not finish because of a persistent transient fault; nothing was rejected."""


_OPEN_FAILURE = re.compile(
    r"not recognized as being in a supported file format|does not exist in the file system|"
    r"No such file or directory",
    re.IGNORECASE,
)


def is_open_failure(exc: BaseException) -> bool:
    """GDAL could not open a file it was given. Once inventory has opened a product's files, this is
    not a property of the product: the file vanished or could not be fetched (GDAL reports a failed
    /vsis3/ read during an outage as an unrecognised format)."""
    return isinstance(exc, FileNotFoundError) or bool(_OPEN_FAILURE.search(str(exc)))


# Errors that say the code is wrong, whatever the product: the same error would reject every product of
# an archive one by one, so they fail the stage instead. A product's own faults reach the stages as
# ProductError, RasterioError, ValueError or OSError (parsing and reading raise those).
_CODE_FAULTS = (AttributeError, NameError, ImportError, TypeError, AssertionError, NotImplementedError)


def is_code_fault(exc: BaseException) -> bool:
    return isinstance(exc, _CODE_FAULTS)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a fault of the environment, not of the product."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransientError | ConnectionError | TimeoutError | MemoryError):
            return True
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True
        if type(current).__name__ in _TRANSIENT_TYPES:
            return True
        if _TRANSIENT_TEXT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


# scheme://user:secret@host -> scheme://***@host; AWS-looking keys and query-string signatures.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^@\s'\"]+@")
_SECRETS = (
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+"),
    re.compile(
        r"(?i)((?:aws_)?(?:secret_access_key|session_token|password|secret)[\"']?\s*[:=]\s*[\"']?)[^\s,'\"}]+"
    ),
)


def redact(text: str) -> str:
    """`text` without credentials: user info in URIs, access key ids, signatures, secret values."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), redacted: what a user is shown."""
    message = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    return redact(message or type(exc).__name__)
