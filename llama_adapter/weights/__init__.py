"""Weight files: base checkpoints (Meta, Hugging Face), adapter files (official V1/V2, ours), names resolved to files."""
