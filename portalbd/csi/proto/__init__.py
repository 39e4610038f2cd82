"""Generated CSI v1 stubs; regenerate with ``python -m portalbd.csi.stubs``."""
