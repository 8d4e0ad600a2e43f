"""Hosted repositories: uploads, manifest push and delete, referrers, garbage collection."""
