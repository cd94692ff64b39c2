"""Evaluation on the paper's benchmarks (ScienceQA, COCO Caption, instruction following): ``python -m llama_adapter.eval``."""
