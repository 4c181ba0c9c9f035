"""The ``cl-hres`` command line (:func:`main`)."""

from cl_hres.cli.app import main

__all__ = ["main"]
