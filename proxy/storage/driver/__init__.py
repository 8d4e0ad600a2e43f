"""Storage drivers: bytes under keys, one module per backend (see :mod:`.base`)."""
