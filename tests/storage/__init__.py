"""Storage: the filesystem and S3 stores, the on-disk layout and its upgrade, eviction."""
