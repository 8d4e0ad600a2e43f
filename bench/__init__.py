"""Side-by-side benchmark of regproxy, distribution and nginx (see README.md)."""
