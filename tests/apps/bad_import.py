"""An app module that fails while being imported."""

raise RuntimeError("database not configured")
