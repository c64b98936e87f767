"""scrollzarr: OME-Zarr tools for the Vesuvius Challenge.

The public API is small: :func:`scrollzarr.pipeline.plan_conversion` and
:func:`scrollzarr.pipeline.convert` turn a TIFF stack into an OME-Zarr; the
command-line scripts beside the package call them.
"""

__version__ = "0.1.0"
