"""Where published models live: a local directory or an object-store URL (``s3://bucket/models``,
``gs://...``, ``file:///...``: any fsspec filesystem). A light module (no torch, and fsspec only
imported to check a URL) for the configuration types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["StoreLocation", "check_url", "is_url", "parse_location"]

# A scheme of two characters or more (so that a Windows drive, C:\\, stays a path).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_url(root: object) -> bool:
    """Whether ``root`` names an object store (a string with a scheme, ``s3://...``)."""
    return isinstance(root, str) and _SCHEME.match(root) is not None


def check_url(url: str) -> str:
    """``url`` if fsspec and its backend for the URL's scheme are installed, else ``ValueError``
    saying what to install."""
    scheme = _SCHEME.match(url).group(1).lower()
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"{url!r} is an object-store URL, which needs fsspec: pip install 'tgnstream[s3]' "
            f"(or fsspec and its backend for {scheme}://), or give a local directory"
        ) from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise ValueError(
            f"{url!r} needs fsspec's backend for {scheme}://, which is not installed ({e}); for s3:// "
            "pip install 'tgnstream[s3]'"
        ) from None
    except ValueError:
        raise ValueError(
            f"unknown storage scheme {scheme!r} in {url!r}: give a local directory or an fsspec URL "
            "(s3://bucket/prefix, gs://bucket/prefix, file:///path, ...)"
        ) from None
    return url


def parse_location(value: object) -> Path | str:
    """A models directory: a ``Path`` for a local one, the URL (a ``str``) for an object store
    (checked: a known scheme whose fsspec backend is installed)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a directory or a URL, got {type(value).__name__}")
    if is_url(value):
        return check_url(value)
    return Path(value)


# A config field holding a local directory or an object-store URL (see ``parse_location``).
StoreLocation = Annotated[Path | str, BeforeValidator(parse_location)]
