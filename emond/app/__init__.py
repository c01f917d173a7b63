"""The service trees of each process, the twistd plugin targets, the embedded Redis, the
programs run beside emond, and the local cluster (``bin/cluster``)."""
