"""The OpenAI-compatible chat server, its request and response formats, and the chat page."""
