"""The version of rgemma (also written into every state file it saves)."""

__version__ = "0.1.0"
