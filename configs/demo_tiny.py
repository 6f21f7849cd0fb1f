"""A tiny VasoMIM on synthetic angiograms: minutes on 2 CPU cores, runs on 8 fake devices.

vasomim pretrain --config=configs/demo_tiny.py --workdir=demo_out/workdir
"""

from configs import common


def get_config():
    c = common.pretrain_config()
    c.dataset.name = "synthetic_angio/small"
    c.dataset.data_dir = "demo_out/tfds"
    c.batch_size = 32  # a multiple of 8: one example block per fake device
    c.epochs = 0
    c.total_steps = 300
    c.log_every_steps = 10
    c.model = common.model_config("ti", patch_size=8, img_size=64, in_chans=1)
    c.model.decoder_embed_dim = 128
    c.model.decoder_depth = 2
    c.model.decoder_num_heads = 4
    c.masking.beta_per = "step"
    c.loss.frangi_sigmas = (1.0, 2.0)
    c.optim.base_lr = 1.2e-2  # lr 1.5e-3 at batch 32: a tiny model has 300 steps to learn something visible
    c.checkpoint.every_steps = 100
    c.metrics.panels_every_steps = 100
    return c
