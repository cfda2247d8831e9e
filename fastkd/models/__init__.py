"""The encoders: the family registry (where each architecture keeps what fastkd reads), activation capture,
the layer parts ETD cuts and resized configs, and loading and running the teacher."""
