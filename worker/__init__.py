"""forklift workers: a Celery prefork pool running registered jobs."""
