"""Storage: drivers (bytes under keys), the repository semantics over them, the local
staging area of fills, and uploads."""

from proxy.storage.base import BlobStat, Store, StoredManifest
from proxy.storage.driver.base import ObjectWriter
from proxy.storage.localfs import BlobWriter
from proxy.storage.registry import RegistryStore
from proxy.storage.staging import Staging
from proxy.storage.uploads import Upload, UploadStore

__all__ = ["BlobStat", "BlobWriter", "ObjectWriter", "RegistryStore", "Staging", "Store",
           "StoredManifest", "Upload", "UploadStore"]
