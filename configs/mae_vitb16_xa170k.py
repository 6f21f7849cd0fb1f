"""The random-masking MAE baseline: the VasoMIM recipe with guidance and consistency switched off."""

from configs import common


def get_config():
    c = common.pretrain_config()
    c.masking.beta_start = 0.0
    c.masking.beta_end = 0.0
    c.loss.consistency_weight = 0.0
    return c
