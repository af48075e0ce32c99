"""phi1: an experiment harness for "Textbooks Are All You Need" (phi-1, arXiv 2306.11644)."""

__version__ = "0.1.0"
