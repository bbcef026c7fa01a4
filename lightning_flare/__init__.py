"""lightning_flare."""
