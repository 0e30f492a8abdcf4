"""The REST teacher service (FastAPI): create_app(settings)."""
