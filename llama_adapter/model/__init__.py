"""The networks: LLaMA with zero-init attention adapters, its projections and int8 form, and the CLIP visual side."""
