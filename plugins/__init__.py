"""mailflow builtin plugins (installed as the `mailflow_plugins` package)."""
