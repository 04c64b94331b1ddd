"""meterproxy: a transparent OpenAI-compatible proxy that meters every call."""

__version__ = "0.1.0"
