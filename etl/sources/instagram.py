"""instagram source (being written)."""
