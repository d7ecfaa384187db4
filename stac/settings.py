"""The manifest's `catalog:` section: names, licence and partitioning of the STAC catalog.

Errors are `ManifestError` (a `ValueError`); an unknown key is named (`unknown key 'catalog.licence'`),
as in every manifest section. The defaults describe a SpectralEarth build; a build that republishes data
under other terms sets `license`, `attribution` and `providers` itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sections import ManifestError, check_keys

SECTION = "catalog"

# Beyond this many links a leaf catalog could pass 1 MB (an item link is about 150 bytes when written
# with indentation; 6000 of them are about 0.9 MB). Checked by the tests against a real serialisation.
MAX_ITEMS_PER_CATALOG = 6000

_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
# An SPDX licence identifier (possibly an expression like "CC-BY-4.0 OR MIT" is not allowed by STAC 1.1:
# a single identifier, or "other" with a licence link).
_SPDX = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")
_PROVIDER_ROLES = ("licensor", "producer", "processor", "host")


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    roles: tuple[str, ...] = ()
    url: str | None = None
    description: str | None = None

    KEYS = frozenset({"name", "roles", "url", "description"})

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Provider:
        check_keys(raw, cls.KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ManifestError(f"'{where}.name' must be a non-empty text, got {name!r}")
        roles = raw.get("roles") or []
        if not isinstance(roles, list) or any(role not in _PROVIDER_ROLES for role in roles):
            raise ManifestError(
                f"'{where}.roles' must be a list of {', '.join(_PROVIDER_ROLES)}; got {roles!r}"
            )
        url = raw.get("url")
        if url is not None and not (isinstance(url, str) and re.match(r"https?://", url)):
            raise ManifestError(f"'{where}.url' must be an http(s) URL, got {url!r}")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            raise ManifestError(f"'{where}.description' must be text, got {description!r}")
        return cls(name=name, roles=tuple(roles), url=url, description=description)

    def to_stac(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.roles:
            out["roles"] = list(self.roles)
        if self.url:
            out["url"] = self.url
        return out


DEFAULT_PROVIDERS = (
    Provider(
        name="DLR (German Aerospace Center)",
        roles=("producer", "licensor"),
        url="https://www.enmap.org/",
        description="EnMAP mission operator; produces the L2A surface reflectance products.",
    ),
)

DEFAULT_DESCRIPTION = (
    "SpectralEarth-style hyperspectral patches: 128 x 128 px EnMAP L2A surface reflectance (int16, "
    "x 0.0001) on a global per-UTM-zone grid of 3840 m cells, one item per cell and acquisition, read from "
    "one Zarr store."
)
DEFAULT_KEYWORDS = (
    "EnMAP",
    "hyperspectral",
    "imaging spectroscopy",
    "surface reflectance",
    "L2A",
    "SpectralEarth",
    "foundation models",
)


def _licence(license_id: Any, license_url: Any) -> tuple[str, str | None]:
    if not isinstance(license_id, str) or not _SPDX.fullmatch(license_id):
        raise ManifestError(f"'{SECTION}.license' must be an SPDX identifier or 'other', got {license_id!r}")
    if license_url is not None and not (isinstance(license_url, str) and re.match(r"https?://", license_url)):
        raise ManifestError(f"'{SECTION}.license_url' must be an http(s) URL, got {license_url!r}")
    if license_id == "other" and license_url is None:
        raise ManifestError(
            f"'{SECTION}.license' is 'other': set '{SECTION}.license_url' to the licence text"
        )
    return license_id, license_url


def _providers(raw: Any, default: tuple[Provider, ...]) -> tuple[Provider, ...]:
    if raw is None:
        return default
    if not isinstance(raw, list):
        raise ManifestError(f"'{SECTION}.providers' must be a list of {{name, roles, url}}")
    return tuple(Provider.from_dict(p, f"{SECTION}.providers[{n}]") for n, p in enumerate(raw))


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    """What the `catalog` stage writes besides the data: identifiers, texts, licence, partitioning."""

    collection_id: str = "spectralearth-enmap-patches"
    scene_collection_id: str = "enmap-l2a-scenes"
    catalog_id: str = "spectralearth"
    title: str = "SpectralEarth EnMAP patches"
    description: str = DEFAULT_DESCRIPTION
    license: str = "CC-BY-4.0"
    license_url: str | None = None  # a `license` link; STAC asks for one when `license` is "other"
    # "[year]" is replaced by the years of the acquisitions in the build (e.g. "2022-2024").
    attribution: str = "Contains modified EnMAP data © DLR [year]"
    providers: tuple[Provider, ...] = DEFAULT_PROVIDERS
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    items_per_catalog: int = 5000  # most item (or child) links in one catalog or collection file

    KEYS = frozenset(
        {
            "collection_id",
            "scene_collection_id",
            "catalog_id",
            "title",
            "description",
            "license",
            "license_url",
            "attribution",
            "providers",
            "keywords",
            "items_per_catalog",
        }
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> CatalogSettings:
        raw = {} if raw is None else raw
        check_keys(raw, cls.KEYS, SECTION)
        default = cls()
        values: dict[str, Any] = {}
        for key in ("collection_id", "scene_collection_id", "catalog_id"):
            value = raw.get(key, getattr(default, key))
            if not isinstance(value, str) or not _ID.fullmatch(value):
                raise ManifestError(
                    f"'{SECTION}.{key}' must be a lowercase identifier (a-z, 0-9, '.', '_', '-'), "
                    f"got {value!r}"
                )
            values[key] = value
        if len({values["collection_id"], values["scene_collection_id"], values["catalog_id"]}) != 3:
            raise ManifestError(f"'{SECTION}.collection_id', scene_collection_id and catalog_id must differ")
        for key in ("title", "description", "attribution"):
            value = raw.get(key, getattr(default, key))
            if not isinstance(value, str) or not value.strip():
                raise ManifestError(f"'{SECTION}.{key}' must be a non-empty text, got {value!r}")
            values[key] = value
        license_id, license_url = _licence(raw.get("license", default.license), raw.get("license_url"))
        providers = _providers(raw.get("providers"), default.providers)
        keywords = raw.get("keywords", list(default.keywords))
        if not isinstance(keywords, list | tuple) or not all(isinstance(k, str) and k for k in keywords):
            raise ManifestError(f"'{SECTION}.keywords' must be a list of texts, got {keywords!r}")
        per_catalog = raw.get("items_per_catalog", default.items_per_catalog)
        if isinstance(per_catalog, bool) or not isinstance(per_catalog, int):
            raise ManifestError(f"'{SECTION}.items_per_catalog' must be an integer, got {per_catalog!r}")
        if not 2 <= per_catalog <= MAX_ITEMS_PER_CATALOG:
            raise ManifestError(
                f"'{SECTION}.items_per_catalog' must be within [2, {MAX_ITEMS_PER_CATALOG}] "
                f"(a catalog file stays under 1 MB), got {per_catalog}"
            )
        return cls(
            **values,
            license=license_id,
            license_url=license_url,
            providers=providers,
            keywords=tuple(keywords),
            items_per_catalog=per_catalog,
        )

    def attribution_text(self, first_year: int | None, last_year: int | None) -> str:
        if first_year is None or last_year is None:
            years = ""
        else:
            years = str(first_year) if first_year == last_year else f"{first_year}-{last_year}"
        return " ".join(self.attribution.replace("[year]", years).split())
