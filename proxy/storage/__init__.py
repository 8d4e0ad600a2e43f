"""The content store: blobs and manifests by digest, tags and repository links."""

from proxy.storage.filesystem import BlobWriter, FilesystemStore, StoredManifest

__all__ = ["BlobWriter", "FilesystemStore", "StoredManifest"]
