"""Data: manifests -> checked, encoded cache -> Boson samples -> collated micro-batches."""
