"""Data: the synthetic benchmark, shard reading and writing, transforms, task formatting, the DataModule."""
