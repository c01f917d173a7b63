"""The service trees of each process, the twistd plugin targets, the embedded Redis."""
