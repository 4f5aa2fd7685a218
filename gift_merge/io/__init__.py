"""Everything that knows file formats: checkpoints, adapters, the output folder."""
