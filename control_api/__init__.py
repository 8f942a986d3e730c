"""The control-centre HTTP API (FastAPI)."""
