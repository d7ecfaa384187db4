"""STAC catalog building, stac-geoparquet and search for a SpectralEarth build."""
