"""LightningModules and the nets they wrap."""
