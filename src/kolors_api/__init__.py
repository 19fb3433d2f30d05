"""kolors-api: a self-hosted, Segmind- and OpenAI-compatible text-to-image API for Kolors."""

__version__ = "0.1.0"
__all__ = ["__version__"]
