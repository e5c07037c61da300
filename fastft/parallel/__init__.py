"""Process groups and training backends (single process, DDP, DeepSpeed) behind one small protocol."""
