"""Local stand-ins for the services a developer cannot reach offline (Ably, OpenAI)."""
