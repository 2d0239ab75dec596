"""covidseg: COVID-19 infection segmentation in lung CT.

`shared` is the domain core used by the API, the workers, the CLI and training. It never imports Flask or
Celery (those live in `api/` and `worker/`).
"""

__version__ = "0.1.0"
