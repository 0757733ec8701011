"""The celeriac app of this Django project (Celery's ``proj/celery.py``, import swapped).

Run a worker from the project folder:  celeriac -A proj worker -l INFO
"""

import os

from celeriac import Celery

# The settings module the worker uses.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")

# Every setting named CELERY_* in settings.py: CELERY_BROKER_URL -> broker_url ...
app.config_from_object("django.conf:settings", namespace="CELERY")

# The tasks.py module of each app in INSTALLED_APPS.
app.autodiscover_tasks()
