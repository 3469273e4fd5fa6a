"""Lightning callbacks that probe training (they talk to the module through documented attributes)."""
