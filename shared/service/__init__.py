"""The service's infrastructure, shared by the API and the workers: the typed settings, the job database,
object storage, the Celery app and admin users. No TensorFlow here: the API process imports this package."""
