"""What makes a product or an archive unusable: `ProductError` (its message is the one-line reason)
and `ArchiveRejected` (an archive refused whole); the reasons over a budget (`format_size`,
`over_budget`); and `corrupt_bytes_error`, which tells an OSError the archive's bytes caused from a
fault of the storage (raised, so the stage retries it; never a rejection).
"""

from __future__ import annotations

import errno
import gzip

from pipeline.errors import is_transient


class ProductError(Exception):
    """A product (or archive) that cannot be used; the message is the one-line reason."""


class ArchiveRejected(ProductError):
    """An archive refused whole (an entry escapes its folder: it is not a genuine delivery). Raised by
    `iter_products` even after products of the archive were yielded: the caller drops them."""


def format_size(size: int) -> str:
    """`20.0 GiB`, `3.0 MiB`, `512 bytes`: sizes as a user reads them in a reason."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def over_budget(what: str, verb: str, size: int, budget: int, kind: str) -> str:
    """The one-line reason for something over a budget, with both sizes."""
    return f"{what} {verb} {format_size(size)}, over the {format_size(budget)} {kind} budget"


def corrupt_bytes_error(exc: BaseException) -> bool:
    """An OSError that the archive's bytes caused (a gzip or bzip2 stream that is not one, a seek to a
    negative offset a corrupt directory names), as opposed to a fault of the file system or network."""
    if not isinstance(exc, OSError) or is_transient(exc):
        return False
    return isinstance(exc, gzip.BadGzipFile) or exc.errno in (None, errno.EINVAL)
