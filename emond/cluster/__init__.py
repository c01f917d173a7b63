"""Shards: the user -> shard map, routing of posts and reads to a user's shard, user moves."""
