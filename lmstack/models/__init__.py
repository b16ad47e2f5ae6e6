from lmstack.models import decoder  # noqa: F401  (registers model.decoder)
from lmstack.models import encoder  # noqa: F401  (registers model.encoder)
from lmstack.models import encoder_decoder  # noqa: F401  (registers model.encoder_decoder)
from lmstack.models import two_tower  # noqa: F401  (registers model.two_tower)
