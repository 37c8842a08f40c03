"""The local cluster's control plane: API server, object store, admission (built-in kinds and CRD
schemas), patches, selectors, tables, and `local.LocalCluster`, which starts it all."""
