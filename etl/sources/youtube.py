"""youtube source (being written)."""
