"""Django integration: see :mod:`celeriac.fixups.django` and :mod:`.task`."""
