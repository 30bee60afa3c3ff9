"""nanochat for DGX Spark: train, chat with and share a small ChatGPT-like model."""
