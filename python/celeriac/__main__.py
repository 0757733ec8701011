"""``python -m celeriac``: the same as the ``celeriac`` command."""

from celeriac.cli import run

if __name__ == "__main__":
    run()
