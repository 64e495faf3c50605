"""Built-in jobs: plain functions registered with `shared.registry.job`, no Celery import."""
