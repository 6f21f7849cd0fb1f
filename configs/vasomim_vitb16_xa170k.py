"""VasoMIM pre-training of ViT-B/16 on XA-170K: the paper recipe (official XA-SSL launch values).

vasomim pretrain --config=configs/vasomim_vitb16_xa170k.py --workdir=DIR
"""

from configs import common


def get_config():
    return common.pretrain_config()
