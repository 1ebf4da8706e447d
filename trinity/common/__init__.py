"""The original's ``trinity.common`` import paths, re-exporting ``trinity.compat`` (only)."""
