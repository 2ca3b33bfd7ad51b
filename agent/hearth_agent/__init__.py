"""Hearth host agent: enrollment, the websocket session, the model cache and the sandboxed worker."""

__version__ = "0.1.0"
