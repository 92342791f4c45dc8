"""Cluster-level pieces: placement by node labels, pool sizing, the FastAPI control service."""
