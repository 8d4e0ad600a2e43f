"""Storage: the driver contract and each driver, the Store contract on both backends, the
on-disk layout and its upgrade, eviction."""
