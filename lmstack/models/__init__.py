from lmstack.models import decoder  # noqa: F401  (registers model.decoder)
