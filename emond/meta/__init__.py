"""The database: schema and migrations, users, authentication, inputs, feeds (all SQL here)."""
