"""vramgate: an OpenAI-compatible gateway that routes requests to vLLM engines it places and runs."""

__version__ = "0.1.0"
