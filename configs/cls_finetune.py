"""Image classification on a `class_folder` build, full fine-tuning (layer decay 0.75, drop-path 0.1).

vasomim finetune --config=configs/cls_finetune.py --workdir=DIR --config.dataset.data_dir=... \
    --config.num_classes=2 --config.init_from=PRETRAIN_WORKDIR
"""

from configs import common


def get_config():
    c = common.finetune_config("classification")
    c.dataset.name = "class_folder"
    c.num_classes = 2
    c.batch_size = 64
    c.total_steps = 3000
    c.optim.base_lr = 5e-4
    return c
