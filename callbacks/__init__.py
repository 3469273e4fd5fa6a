"""Lightning callbacks that probe training (they talk to the module through documented attributes).

Under DDP, which rank holds what: `PruneRewind` and `EarlyStopTrace` hold the same state on every rank;
`RewindProbe`, `MemorizationTracker` and `SmoothnessProbe` evaluate once, on global rank 0, and only
rank 0 holds their results (they stay empty on the others). `pipelines.training.train` then gives every
rank rank 0's state; under a plain `Trainer(strategy="ddp")` read them on rank 0 (see examples/).
"""
