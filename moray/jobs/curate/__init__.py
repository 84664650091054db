"""Curation on Ray Data: raw sources -> packed token shards (see pipeline.py and README.md)."""
