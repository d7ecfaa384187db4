from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from pipeline.manifest import BandPolicy, Manifest, ManifestError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["spectralearth", "demo"])
def test_shipped_manifests_validate(name):
    manifest = Manifest.from_yaml(REPO / "manifests" / f"{name}.yaml")
    assert manifest.name == name
    assert manifest.bands.expected_count == 224


def test_spectralearth_band_policy_keeps_202_bands():
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


def test_band_policy_rejects_other_band_counts():
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
def test_invalid_manifests_name_the_key(raw, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(raw, source="test.yaml")


def test_manifest_error_names_the_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: x\nfilters:\n  cloud: 3\n")
    with pytest.raises(ManifestError, match=rf"{path}: unknown key 'filters.cloud'"):
        Manifest.from_yaml(path)


def test_config_hash_is_stable_and_sensitive():
    a = Manifest.from_dict({"name": "a", "filters": {"max_cloud_cover": 10}})
    b = Manifest.from_dict({"name": "b", "filters": {"max_cloud_cover": 10}})
    c = Manifest.from_dict({"name": "a", "filters": {"max_cloud_cover": 20}})
    assert a.config_hash("filters", "bands") == b.config_hash("bands", "filters")
    assert a.config_hash("filters") != c.config_hash("filters")
    # Known value: a change here means every existing build would be redone.
    assert len(a.config_hash("filters")) == 16
    hash(a)  # frozen, so usable as a Dask task argument and a dict key


def test_filters():
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
    assert "before start_date" in filters.reject_reason(datetime(2022, 6, 1, tzinfo=UTC), 5, "V010303")
    assert "after end_date" in filters.reject_reason(datetime(2024, 1, 1, tzinfo=UTC), 5, "V010303")
    assert "cloud cover 11 %" in filters.reject_reason(t, 11, "V010303")
    assert "not in [V010303]" in filters.reject_reason(t, 5, "V010400")
