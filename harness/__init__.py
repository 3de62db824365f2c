"""Verification harness for Hugging Face <-> Megatron checkpoint conversion."""

__version__ = "0.1.0"
