"""The frozen-values cache of `wspo precompute`: fingerprints (`fingerprint`), the store's reader and
writer (`store`), and the pass that fills it (`precompute`)."""

from wspo_lightning.cache.store import FORMAT, MANIFEST, VERSION, LogpsCache, read_manifest

__all__ = ["FORMAT", "MANIFEST", "VERSION", "LogpsCache", "read_manifest"]
