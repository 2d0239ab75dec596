"""The domain core: image I/O, preprocessing, the model, inference backends, rendering, metrics, lung masks,
whole-study analysis and DICOM SEG.

It imports no service library (Flask, Celery, SQLAlchemy, the S3 and Redis clients) and nothing from
`shared.service`, `api`, `worker`, `training` or `cli`; tests/test_layering.py checks this.
"""
