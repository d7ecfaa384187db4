from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.manifest import BandPolicy, Manifest, ManifestError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["spectralearth", "demo"])
def test_shipped_manifests_validate(name: str) -> None:
    manifest = Manifest.from_yaml(REPO / "manifests" / f"{name}.yaml")
    assert manifest.name == name
    assert manifest.bands.expected_count == 224


def test_spectralearth_band_policy_keeps_202_bands() -> None:
    import csv

    table = REPO / "pipeline" / "enmap" / "data" / "v010303_bands.csv"
    with table.open() as handle:
        wavelengths = tuple(float(row["wavelength_nm"]) for row in csv.DictReader(handle))
    manifest = Manifest.from_yaml(REPO / "manifests" / "spectralearth.yaml")
    kept = manifest.bands.kept_bands(wavelengths)
    assert len(kept) == 202
    dropped = sorted(set(range(1, 225)) - set(kept))
    assert dropped == list(range(127, 142)) + list(range(161, 168))
    # The same policy as wavelength ranges gives the same bands (the SPEC's 1295.3 nm is 1295.28).
    by_wavelength = BandPolicy(expected_count=None, drop_wavelengths_nm=((1295.2, 1519.3), (1738.9, 1968.0)))
    assert by_wavelength.kept_bands(wavelengths) == kept


def test_band_policy_rejects_other_band_counts() -> None:
    policy = BandPolicy(expected_count=224, drop_bands=((127, 141),))
    assert policy.check(tuple(range(400, 618))) == "has 218 bands; the manifest's band policy expects 224"
    assert policy.check(tuple(float(w) for w in range(400, 624))) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x", "filter": {}}, "unknown key 'filter'"),
        ({"name": "x", "filters": {"max_clouds": 3}}, "unknown key 'filters.max_clouds'"),
        ({"name": "x", "bands": {"drop": []}}, "unknown key 'bands.drop'"),
        ({"name": "x", "filters": {"max_cloud_cover": "low"}}, "'filters.max_cloud_cover' must be a number"),
        ({"name": "x", "filters": {"max_cloud_cover": 120}}, "'filters.max_cloud_cover' must be within"),
        ({"name": "x", "filters": {"start_date": "yesterday"}}, "'filters.start_date' must be a date"),
        ({"name": "x", "filters": {"processor_versions": ["1.3"]}}, "'filters.processor_versions'"),
        ({"name": "x", "bands": {"drop_bands": [[141, 127]]}}, "'bands.drop_bands\\[0\\]' is empty"),
        ({"name": "x", "bands": {"drop_bands": [[220, 230]]}}, "above expected_count"),
        ({"name": "bad name"}, "'name' must be"),
        ({}, "'name' must be"),
        ([1, 2], "must be a YAML mapping"),
    ],
)
def test_invalid_manifests_name_the_key(raw: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(raw, source="test.yaml")


def test_manifest_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("name: x\nfilters:\n  cloud: 3\n")
    with pytest.raises(ManifestError, match=rf"{path}: unknown key 'filters.cloud'"):
        Manifest.from_yaml(path)


def test_config_hash_is_stable_and_sensitive() -> None:
    a = Manifest.from_dict({"name": "a", "filters": {"max_cloud_cover": 10}})
    b = Manifest.from_dict({"name": "b", "filters": {"max_cloud_cover": 10}})
    c = Manifest.from_dict({"name": "a", "filters": {"max_cloud_cover": 20}})
    assert a.config_hash("filters", "bands") == b.config_hash("bands", "filters")
    assert a.config_hash("filters") != c.config_hash("filters")
    # Known value: a change here means every existing build would be redone.
    assert len(a.config_hash("filters")) == 16
    hash(a)  # frozen, so usable as a Dask task argument and a dict key


def test_filters() -> None:
    filters = Manifest.from_dict(
        {
            "name": "f",
            "filters": {
                "start_date": "2023-01-01",
                "end_date": "2023-12-31",
                "max_cloud_cover": 10,
                "processor_versions": ["V010303"],
            },
        }
    ).filters
    assert filters.start_date == date(2023, 1, 1)
    t = datetime(2023, 6, 1, 10, tzinfo=UTC)
    assert filters.reject_reason(t, 5, "V010303") is None
    assert "before start_date" in (
        filters.reject_reason(datetime(2022, 6, 1, tzinfo=UTC), 5, "V010303") or ""
    )
    assert "after end_date" in (filters.reject_reason(datetime(2024, 1, 1, tzinfo=UTC), 5, "V010303") or "")
    assert "cloud cover 11 %" in (filters.reject_reason(t, 11, "V010303") or "")
    assert "not in [V010303]" in (filters.reject_reason(t, 5, "V010400") or "")


# Numbers: finite and in range, the error names the key ------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"quality": {"max_fraction": {"cloud": NAN}}}, "'quality.max_fraction.cloud' must be a finite"),
        ({"quality": {"max_fraction": {"snow": INF}}}, "'quality.max_fraction.snow' must be a finite"),
        (
            {"quality": {"max_fraction": {"cloud": 1.5}}},
            r"'quality.max_fraction.cloud' must be within \[0, 1\]",
        ),
        ({"filters": {"max_cloud_cover": NAN}}, "'filters.max_cloud_cover' must be a finite"),
        ({"filters": {"max_cloud_cover": -INF}}, "'filters.max_cloud_cover' must be a finite"),
        ({"grid": {"pixel_size": INF}}, "'grid.pixel_size' must be a finite"),
        ({"grid": {"pixel_size": 5000}}, r"'grid.pixel_size' must be within \[0.001, 1000\]"),
        ({"grid": {"offset": NAN}}, "'grid.offset' must be a finite"),
        ({"grid": {"offset": 30}}, "'grid.offset' must be below grid.pixel_size"),
        ({"grid": {"offset": -1}}, "'grid.offset' must be >= 0"),
        (
            {"bands": {"drop_wavelengths_nm": [[1000, INF]]}},
            r"'bands.drop_wavelengths_nm\[0\]' must be a finite",
        ),
        (
            {"bands": {"drop_wavelengths_nm": [[NAN, 1200]]}},
            r"'bands.drop_wavelengths_nm\[0\]' must be a finite",
        ),
        ({"limits": {"memory_bytes": 0}}, "'limits.memory_bytes' must be an integer >= 1"),
        ({"limits": {"scratch_bytes": -5}}, "'limits.scratch_bytes' must be an integer >= 1"),
        ({"limits": {"memory_bytes": 1.5e9}}, "'limits.memory_bytes' must be an integer"),
        ({"limits": {"xml_bytes": True}}, "'limits.xml_bytes' must be an integer"),
        ({"limits": {"memory_bytes": 2**20, "xml_bytes": 2**21}}, "'limits.xml_bytes' .* must not exceed"),
        ({"write": {"compression_level": 10}}, "'write.compression_level' must be 1-9"),
    ],
)
def test_numbers_are_finite_and_in_range(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict({"name": "x", **raw}, source="m.yaml")


def test_nan_read_from_yaml_is_an_error_not_no_limit(tmp_path: Path) -> None:
    # YAML's .nan and .inf are how such values really arrive
    path = tmp_path / "m.yaml"
    path.write_text("name: x\nquality:\n  max_fraction:\n    cloud: .nan\nfilters:\n  max_cloud_cover: 10\n")
    with pytest.raises(
        ManifestError, match=rf"^{path}: 'quality.max_fraction.cloud' must be a finite number"
    ):
        Manifest.from_yaml(path)
    path.write_text("name: x\ngrid:\n  pixel_size: .inf\n")
    with pytest.raises(ManifestError, match="'grid.pixel_size' must be a finite number, got inf"):
        Manifest.from_yaml(path)


@pytest.mark.parametrize("size", [7, 0, -128, 8, 24, 32, 40, 1000, 1040, 2048, True, 128.0, "128"])
def test_patch_size_outside_the_grid_rule_is_refused_with_the_rule(size: object) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict({"name": "x", "grid": {"patch_size": size}})
    message = str(caught.value)
    assert "\n" not in message
    assert "'grid.patch_size' must be a multiple of 16 from 16 to 1024" in message
    assert "wider than 1000 m" in message and f"got {size!r}" in message


def test_patch_size_rule_accepts_what_the_grid_allows() -> None:
    from pipeline.grid import LOCATION_ID_MAX_INDEX, GridSpec

    allowed = []
    for size in range(1, 1100):
        for pixel in (30.0, 62.6):
            try:
                grid = Manifest.from_dict(
                    {
                        "name": "x",
                        "grid": {"patch_size": size, "pixel_size": pixel, "offset": 0},
                        "write": {"patches_per_shard": 2},  # shards of the largest patches fit 3 GiB
                    }
                ).grid
            except ManifestError:
                continue
            allowed.append((size, pixel))
            # every accepted grid writes the largest UTM northing (10,000,000 m) as a 4-digit index
            spec = GridSpec(grid.patch_size, grid.pixel_size, grid.offset)
            assert int(10_000_000 // spec.cell_size) <= LOCATION_ID_MAX_INDEX
    assert {s for s, p in allowed if p == 30.0} == set(range(48, 1025, 16))
    assert {s for s, p in allowed if p == 62.6} == set(range(16, 1025, 16))


def test_shard_too_large_for_the_memory_budget_is_refused_with_its_size() -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict({"name": "x", "write": {"patches_per_shard": 1_000_000_000}}, source="m.yaml")
    message = str(caught.value)
    assert "\n" not in message
    # 1e9 x 224 bands x 128^2 px x 2 bytes = 7.34e15 bytes, over the default 3 GiB budget
    assert message.startswith("m.yaml: 'write.patches_per_shard' 1000000000 makes one shard of 7.34 PB")
    assert "limits.memory_bytes 3.22 GB" in message
    assert "at most 438 patches per shard fit" in message
    assert 438 * 224 * 128**2 * 2 <= 3 * 1024**3 < 439 * 224 * 128**2 * 2


@pytest.mark.parametrize(
    ("per_shard", "patch", "bands", "memory", "fits"),
    [
        (32, 128, 224, 3 * 1024**3, True),
        (438, 128, 224, 3 * 1024**3, True),
        (439, 128, 224, 3 * 1024**3, False),
        (64, 256, None, 2 * 10**9, True),  # no expected_count: 224 bands, the worst case
        (64, 256, None, 10**9, False),
        (100, 128, 100, 100 * 100 * 128**2 * 2, True),
        (101, 128, 100, 100 * 100 * 128**2 * 2, False),
    ],
)
def test_shard_budget_matches_its_formula(
    per_shard: int, patch: int, bands: int | None, memory: int, fits: bool
) -> None:
    raw = {
        "name": "x",
        "write": {"patches_per_shard": per_shard},
        "grid": {"patch_size": patch},
        "bands": {"expected_count": bands},
        "limits": {"memory_bytes": memory, "xml_bytes": 1024},
    }
    if fits:
        manifest = Manifest.from_dict(raw)
        assert manifest.write.patches_per_shard == per_shard
    else:
        with pytest.raises(ManifestError, match="'write.patches_per_shard' .* above limits.memory_bytes"):
            Manifest.from_dict(raw)


def test_input_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(
            {"name": "x", "inputs": ["/data", "s3://KEYID7Q:Wq9/xTopsecretVALUE@bucket/x"]}, source="m.yaml"
        )
    message = str(caught.value)
    assert message.startswith("m.yaml: 'inputs[1]': s3://***@bucket/x: credentials in a URI are refused")
    assert "KEYID7Q" not in message and "Wq9" not in message and "TopsecretVALUE" not in message
