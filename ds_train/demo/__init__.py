"""The embedded demo: a tiny real-format checkpoint, synthetic voice-cloning data, the run summary."""
