"""DMP helpers, distributed checkpointing and distributed statistics."""
