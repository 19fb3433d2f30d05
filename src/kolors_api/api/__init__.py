"""The HTTP API (FastAPI). Importing it never imports torch.

`kolors_api.api.app.create_app` builds the application (the CLI's `serve` runs it); the routers
take what they need from `kolors_api.api.deps`.
"""
