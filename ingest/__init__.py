"""Ingest: the HTTP command API (auth, conversations, messages). Built by the ingest issue."""
