"""WarmServe: multi-LLM serving with one-for-many GPU prewarming."""

__version__ = "0.1.0"
