"""SpectralEarth pipeline: EnMAP L2A scenes to a patch dataset (Zarr) with a STAC catalog."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spectralearth-pipeline")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
