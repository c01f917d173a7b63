"""Input processing: pure process functions, their state in Redis, the input-queue consumer."""
