"""portalbd-csi: the Kubernetes CSI driver (identity, controller and node services)."""
