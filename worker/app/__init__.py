"""The Celery shell: the app, its tasks, the guarded Redis transport, embedded mode."""
