"""What the trainer, the exporter and the engine share: configurations and presets, exact shape
arithmetic, the networks, checkpoint I/O and the engine contract. Nothing here imports the
trainer or the engine."""
