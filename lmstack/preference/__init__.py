"""Preference optimisation math: sequence log-probabilities, the DPO family, KTO and Bradley-Terry reward losses."""
