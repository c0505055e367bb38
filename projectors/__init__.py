"""Projectors: read models in PostgreSQL and Redis caches built from the log."""
