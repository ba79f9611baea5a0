"""hpcbridge: move imaging data between an XNAT archive and an HPC batch scheduler."""

__version__ = "0.1.0"
