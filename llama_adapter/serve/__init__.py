"""Serving: loading a pipeline, the decode engine, and the text side of generation."""
