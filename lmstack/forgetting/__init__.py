"""Continued pre-training against forgetting: the parent's data (:mod:`.parent`), the penalties
registered as ``regularization.NAME`` (:mod:`.penalties`: L2-SP, EWC with :mod:`.fisher`),
replay (:mod:`lmstack.data.replay`) and the ``eval.forgetting`` evaluator."""

# registers regularization.none, regularization.l2sp, regularization.ewc
from lmstack.forgetting import penalties  # noqa: F401
