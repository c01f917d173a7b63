"""Points to disk and back: the feed store, storage-queue senders, remote reads, the storage server."""
