"""cartrack-relay: durable store-and-forward from Frotcom webhooks to Cartrack."""

__version__ = "0.1.0"
