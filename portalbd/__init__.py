"""portalbd: a network block device whose disk lives in SlateDB on object storage."""

__version__ = "0.1.0"
