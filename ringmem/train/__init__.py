"""Context-parallel training: config, packed data, the FSDP2 run, DCP checkpoints."""
