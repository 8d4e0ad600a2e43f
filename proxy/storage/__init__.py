"""The content store: blobs and manifests by digest, tags and repository links."""

from proxy.storage.filesystem import BlobWriter, FilesystemStore, StoredManifest
from proxy.storage.uploads import Upload, UploadStore

__all__ = ["BlobWriter", "FilesystemStore", "StoredManifest", "Upload", "UploadStore"]
