"""minicpm_data: turn raw chat data into MiniCPM's messages format, check it, and measure it.

This package imports neither torch nor transformers at import time; only the tokenizer-using
modules (``tokenizer``, ``render``, ``stats``) load transformers, and only when called.
"""

__version__ = "0.1.0"
