//! Layer-level gradient checkpointing for Burn models.
