"""OpenAI-compatible HTTP serving: `app.create_app` over an `engine.async_engine.AsyncEngine`;
`scripts/serve.py` is the command-line front end (docs/serving.md)."""
