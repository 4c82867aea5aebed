"""The verified model store: manifests of each optional engine's weights, fetch/verify/list, the start-up check."""
