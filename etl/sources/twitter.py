"""twitter source (being written)."""
