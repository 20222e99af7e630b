"""Load and speed scripts for mailflow; run ``python -m benchmarks.smtp_load --help``."""
