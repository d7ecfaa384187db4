"""Synthetic EnMAP Level-2A products, structurally like real ones, deterministic from a seed.

`generate(out_dir, SynthConfig(...))` writes products under `out_dir` plus `out_dir/truth.json` (what was
made) and returns the same information as a `Truth`. The same seed and config give byte-identical files
(no clock time, no absolute paths, no random state outside the seed; zip/tar/gzip timestamps are fixed).
Files are written in `out_dir/.synth-staging/` and moved into place, so a product appears whole.

What a product looks like
-------------------------
- Name `ENMAP01-____L2A-DT<datatake>_<start>Z_<tile>_V<version>_<processed>Z`, files `<name>-<SUFFIX>.<EXT>`
  (see `pipeline.enmap.names`): METADATA.XML, HISTORY.XML, SPECTRAL_IMAGE, QL_PIXELMASK, QL_QUALITY_CLASSES,
  QL_QUALITY_CLOUD, QL_QUALITY_CLOUDSHADOW, QL_QUALITY_HAZE, QL_QUALITY_SNOW, QL_QUALITY_CIRRUS,
  QL_QUALITY_TESTFLAGS, QL_VNIR, QL_SWIR. The METADATA.XML lists exactly the files of the product
  (including the ENVI `.HDR` headers and HISTORY.XML) in `product/productFileInformation`.
- Formats (cycled over the non-ARD products): "GTiff" -> `.TIF`, uncompressed, striped, band interleaved;
  "BSQ" / "BIL" / "BIP" -> ENVI: raw little-endian data `.BSQ`/`.BIL`/`.BIP` plus an upper-case `.HDR`
  header (written by this module, so it holds no absolute path); the spectral image uses the product's
  interleave and every QL layer is written as ENVI BSQ. GDAL (3.10) opens the data file by its path, on disk
  and through `/vsizip/`, and finds the upper-case `.HDR` sidecar itself; CRS, geotransform, nodata and
  interleave are reported as for the GeoTIFF. "ard" packaging always writes every raster as
  `-<LAYER>_COG.tiff` with GDAL's COG driver (DEFLATE + predictor, 256 px blocks, pixel interleaved as GDAL
  3.10 writes multi-band COGs, no overviews: building them takes minutes at full size) and the
  metadata as `-METADATA.xml` (also `-HISTORY.xml`). The other spellings deliveries use are options:
  `ard_raster_extension` "TIF" writes `-<LAYER>_COG.TIF`; `ard_metadata_extension` "XML" or "XML.XML"
  (as DLR's portal has been seen to deliver) names the metadata and history files so.
- Packaging (cycled over products): "folder" -> `<out>/<name>/<files>`; "zip" -> `<out>/<name>.ZIP` with
  folder `<name>/` inside (deflate, level `zip_compresslevel`, 0 = stored); "targz" -> DLR delivery
  `<out>/dims_op_oc_oc-en_<9 digits>_1.tar.gz` holding
  `dims_op_oc_oc-en_<9 digits>_1/ENMAP.HSI.L2A/<name>.ZIP`;
  "ard" -> `<out>/<name>/` with the ARD file names.
- Rasters: SPECTRAL_IMAGE int16, `bands` bands in ascending wavelength (the V010303 table; with fewer than
  224 bands an evenly spaced subset of the table, renumbered 1..N), reflectance x 10000, nodata -32768 (GDAL
  nodata tag / ENVI `data ignore value` set) outside the footprint and in the no-data bands. QL layers are
  uint8 without a nodata tag (like the real ones), uncompressed except QL_PIXELMASK.TIF (DEFLATE; the real
  one is ~8x smaller than uncompressed): CLASSES 1 land, 2 water, 3 background outside the
  footprint, 0 "none of these" (small blobs inside the footprint; the spectrum there is untouched);
  CLOUD/CLOUDSHADOW/HAZE/SNOW 0/1; CIRRUS 0..3; all 0 outside the footprint. PIXELMASK: one band per
  spectral band, 255 outside the footprint, 1 defective (a few pixels and one along-track detector line in
  `defective_bands` bands; their spectral values are left as generated), 0 otherwise. TESTFLAGS bit field
  (0 outside the footprint): bits 0-1 pixel quality (0 nominal, 1 reduced: haze/cirrus, 2 low:
  cloud/shadow), bit 2 cloud test, 3 shadow test, 4 haze test, 5 snow test, 6 cirrus test, 7 water test.
  QL_VNIR / QL_SWIR: 3-band uint8 RGB (bands nearest 847/671/548 nm and 2201/1645/1051 nm, reflectance 0..0.5
  stretched to 0..255, 0 outside the footprint).
- Grid: UTM of the site centre (EPSG 326NN / 327NN), 30 m pixels, origin (upper-left corner) at
  15 m + k x 30 m in x and y. The footprint is a rectangle rotated clockwise by `scene_azimuth` degrees
  (the metadata's sceneAzimuthAngle), centred in the raster. Its size is the rectangle inscribed in the
  raster (1 % margin) but at least large enough to hold a horizontal pair of 128 x 128 cells of the global
  grid (x in [15 + i*3840, ...), y likewise) plus the revisit shifts; the first date of every site is
  aligned so that this pair sits at the raster centre. For large rasters (~1250 px) the footprint is the
  inscribed rectangle (~70 % of the raster, like the real products, many cells inside). For the default
  300 x 280 raster the rectangle (~300 x 226 px) sticks out of the raster at its left and right corners,
  which are clipped by the raster edges (the boundingPolygon still gives the rectangle's corners, slightly
  outside the raster); ~77 % of the raster is valid and every product of tile 001 holds at least 2 grid cells
  wholly inside the valid data (listed per product in truth.json `cells`).
- Ground: per site, smooth random fields over UTM world coordinates (sums of random plane waves, so any
  raster window evaluates the same ground) give the abundances of vegetation, soil, urban and water
  endmembers (water where a field exceeds a per-site threshold, pure water, class 2); spectra are mixed
  linearly and multiplied by a residual water-vapour transmittance (dips at ~940, 1130, 1400, 1900 nm).
  Per-pixel noise comes from a seeded table of noise spectra indexed by a hash of (world pixel, datatake),
  so the same ground pixel has the same land cover on every date and the two tiles of one datatake are
  bit-identical in their overlap; revisits differ only by noise (~0.2-0.5 % reflectance) where clear.
- Atmosphere per datatake (world-coordinate fields, so both tiles of a datatake agree): clouds are
  thresholded smooth blobs with bright flat spectra (~0.55-0.75 in the VNIR, lower in the SWIR), opaque;
  shadows are the cloud mask displaced by `shadow_offset_px` (from `cloud_height_m` and the sun angles,
  opposite to the sun azimuth) outside clouds, multiplying the ground by 0.3; haze adds a blue-weighted
  path reflectance; cirrus levels 1..3 add 0.012 per level (flat); snow (land only, not under clouds)
  replaces the ground by a snow spectrum (bright VNIR, dark beyond 1500 nm). Each QL layer is exactly where
  the effect was put into the image. Fractions per date scatter around the configured amounts.
- Dates: `revisits` datatakes per site, 17-80 days apart (descending orbit, 10:05-10:55 UTC for sites near
  10 deg E, shifted by whole hours with the longitude elsewhere so it stays late morning local time; sun
  angles computed for that time and place), the raster and its footprint shifted by whole pixels (up to
  ~3 % of the raster size). Default sites lie in central Europe (UTM 32/33 N); `site_lonlat` puts them
  anywhere (southern sites get EPSG 327NN). The first `overlapping_tiles` sites
  have a first datatake with tiles 001 and 002: tile 002 is the same footprint moved along track by
  (1 - `tile_overlap`) of the footprint height (rounded to whole pixels), starting a few seconds later.
  At the default 300 x 280 px no 128 px cell lies wholly in both tiles (the cells are too big for a 40 %
  overlap of a 226 px footprint); use larger rasters or `tile_overlap` >= ~0.8 for shared cells.
- Reprocessing: `reprocessed` acquisitions (taken from the last ones backwards) also exist as
  `reprocessed_version` (V010400) processed months later: same datatake, tile, start time, grid and QL
  layers; spectral values differ by an extra small noise (sigma 0.0008 reflectance, ~8 DN).
- METADATA.XML: built with xml.etree, modelled on the real sample (root `level_X`, schema
  metadata_Lx_00-06-00.xsd / 00.06.00) with every element path the reader (`SceneMetadata.from_xml`) and the
  SPEC name. The large sensor blocks of real products (orbit/attitude state vectors, RPCs, frame times)
  are not written. `specific/qualityFlag` percentages are integers, computed from the written QL layers
  over the footprint (pixels with class != 3) and rounded half up: cloudCover (CLOUD), cloudShadow
  (CLOUDSHADOW), hazeCover (HAZE), snowCover (SNOW), cirrusCover (CIRRUS > 0), waterCover (class 2).
  bandStatistics: mean/std of reflectance x gain over the footprint; no-data bands mean -1000000 std 0.
  `backgroundValue` is 0 like in real products (the spectral nodata is -32768).

Modules (each imports only the ones above it)
---------------------------------------------
config (SynthConfig, layout constants) - bands (the V010303 band table) - fields (seeded random fields,
pixel hashes) - grid (UTM zone, footprint rectangle) - plan (sites, datatakes, products from the seed) -
quality_layers (where each effect is, QL layers' contents, cover percentages) - spectra (endmembers,
noise, the spectral image by blocks) - writers (GeoTIFF/COG/ENVI) - rasters (every layer of a product) -
metadata (METADATA.XML by section, HISTORY.XML) - packaging (folder, ZIP, tar.gz, ARD) - truth
(truth.json) - generator (`generate`). `labels` writes the synthetic label sources for the labels stage.

truth.json (`Truth.to_json` / `Truth.from_json`)
-----------------------------------------------
{
  "format": "spectralearth-synth-truth", "version": 1,
  "config": {SynthConfig fields, tuples as lists},
  "sites": [{"site": 0, "epsg": 32632, "lon": .., "lat": .., "scene_azimuth": ..}, ...],
  "products": [{
     "scene_id", "path" (container relative to out_dir: folder, .ZIP or .tar.gz),
     "member" (path of the inner ZIP in a tar.gz, else null), "packaging", "format" ("GTiff", "BSQ", "BIL",
     "BIP" or "COG"), "files" (basenames in the product), "datatake" (10 digits), "tile" (int),
     "processor_version", "processing_time", "start_time", "stop_time" (ISO, UTC), "date" (YYYY-MM-DD),
     "site", "date_index", "epsg", "transform" [a, b, c, d, e, f] (rasterio Affine order), "width",
     "height", "bands", "footprint_utm" / "footprint_lonlat" (closed rings UL, LL, LR, UR, UL of the
     footprint rectangle), "valid_fraction" (share of raster pixels inside the footprint),
     "fractions" {cloud, cloud_shadow, haze, snow, water, cirrus, unclassified} (share of footprint pixels),
     "quality_percent" {cloudCover, cloudShadow, hazeCover, snowCover, cirrusCover, waterCover} (as written),
     "no_data_bands" (1-based), "defective_bands" (1-based), "shadow_offset_px" [dcol, drow] (shadow[r, c]
     = cloud[r - drow, c - dcol] where not cloud), "angles" {sun_elevation, sun_azimuth, scene_azimuth,
     across_off_nadir, along_off_nadir}, "superseded_by" / "supersedes" (scene_id or null),
     "partner_tile" (the other tile of the datatake or null),
     "cells" [{"location_id", "i", "j", "col", "row", "fractions": {...}}] (128 px cells of the global grid
     wholly inside the raster and wholly inside the footprint)}],
  "revisits": {"<site>": [{"date", "datatake", "start_time", "scene_ids"}, ...]} (one entry per datatake),
  "duplicates": [{"datatake", "kinds": ["overlapping_tiles" | "reprocessed"], "scene_ids": [...]}]
     (groups of products showing one acquisition)
}
"""

from pipeline.enmap.synth.bands import BandTable, load_band_table
from pipeline.enmap.synth.config import FORMATS, NODATA, PACKAGINGS, SynthConfig
from pipeline.enmap.synth.generator import generate
from pipeline.enmap.synth.truth import ProductTruth, Truth

__all__ = [
    "SynthConfig",
    "Truth",
    "ProductTruth",
    "generate",
    "load_band_table",
    "BandTable",
    "PACKAGINGS",
    "FORMATS",
    "NODATA",
]
