"""Linear probe on a `class_folder` build: frozen encoder (eval mode, no drop-path), linear head on the cls feature.

vasomim finetune --config=configs/cls_linear_probe.py --workdir=DIR --config.dataset.data_dir=... \
    --config.num_classes=2 --config.init_from=PRETRAIN_WORKDIR
"""

from configs import common


def get_config():
    c = common.finetune_config("classification")
    c.dataset.name = "class_folder"
    c.num_classes = 2
    c.linear_probe = True
    c.drop_path_rate = 0.0
    c.batch_size = 256
    c.total_steps = 2000
    c.optim.lr = 1e-3  # AdamW on a linear head (MAE probes with LARS at lr 0.1; that scale is for LARS)
    c.optim.weight_decay = 0.0
    c.input.rotate_deg = 0.0
    c.input.scale = (1.0, 1.0)
    return c
