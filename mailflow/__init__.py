"""mailflow: a pluggable, milter-style mail filtering pipeline."""

__version__ = "0.1.0"
