"""Binary vessel segmentation on any `vessel_seg_folder` build: ViT-B/16 + UNETR decoder, Dice + BCE, AdamW with
layer decay 0.75, drop-path 0.1 (METHOD §6).

vasomim finetune --config=configs/seg_vessel.py --workdir=DIR \
    --config.dataset.name=vessel_seg_folder --config.dataset.data_dir=... --config.init_from=PRETRAIN_WORKDIR
"""

from configs import common


def get_config():
    c = common.finetune_config("segmentation")
    c.dataset.name = "vessel_seg_folder"
    c.dataset.split = "train"
    c.dataset.eval_split = "test"
    c.optim.lr = 3e-4  # small sets, batch 16: the linear rule would give 3e-5, too slow for the new decoder
    c.optim.warmup_fraction = 0.1
    return c
