"""Sharded asynchronous checkpoints: storage seam, commit protocol, saver and restore."""
