"""The content store: blobs and manifests by digest, tags and repository links."""

from proxy.storage.base import BlobStat, Store, StoredManifest
from proxy.storage.filesystem import BlobWriter, FilesystemStore
from proxy.storage.uploads import Upload, UploadStore

__all__ = ["BlobStat", "BlobWriter", "FilesystemStore", "Store", "StoredManifest", "Upload",
           "UploadStore"]
