"""emond: an ingest-and-storage backend compatible with emoncms.org."""

__version__ = "0.1.0"
