"""Celery's ``celery.utils`` helpers that task code imports."""
