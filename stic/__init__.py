"""STIC: self-training on image comprehension for vision-language models."""

__version__ = "0.1.0"
