"""Helpers the integration and end-to-end tests share (real podman, CNI, namespaces)."""
