"""Shared defaults for every config file (pure ml_collections; of the package it imports only constants).

Numbers are the official XA-SSL launch values (``../shared/METHOD.md`` §3-§5) unless a comment says otherwise.
Every field has a typed default so that any of them can be overridden from the command line
(``--config.optim.base_lr=...``); ml_collections refuses to override fields whose default is ``None``.
"""

from ml_collections import config_dict

from vasomim_jax.models.preprocess import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD  # input normalisation

VIT_SIZES = {  # (embed_dim, depth, num_heads)
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}


def model_config(size: str = "b", patch_size: int = 16, img_size: int = 224, in_chans: int = 3):
    """ViT-MAE architecture; decoder 512 x 8 x 16 is the official lightweight decoder."""
    dim, depth, heads = VIT_SIZES[size]
    return config_dict.ConfigDict(dict(
        name=f"vit_{size}{patch_size}",
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        # Compute dtype of the blocks; parameters, optimizer state and losses stay float32.
        dtype="float32",
        # Rematerialisation of the scanned blocks: "none" | "full" | "dots" (save matmul outputs only) |
        # "dots_no_batch" (save the weight matmuls' outputs only; on XLA CPU also the fastest: the ViT-B step
        # 5.39 -> 4.95 s, benchmarks/RESULTS.md).
        remat_policy="none",
        # Input normalisation inside the jitted step, from uint8.
        mean=IMAGENET_MEAN if in_chans == 3 else GREY_MEAN,
        std=IMAGENET_STD if in_chans == 3 else GREY_STD,
    ))


def pretrain_config():
    """The VasoMIM ViT-B/16 recipe on XA-170K (official values)."""
    c = config_dict.ConfigDict()
    c.seed = 0

    c.dataset = config_dict.ConfigDict(dict(
        name="xa170k/native",  # a TFDS name, `name` or `name/config`
        data_dir="",  # "" = TFDS default (~/tensorflow_datasets)
        split="train",
        # Examples per epoch for the epochs -> steps conversion; -1 = read from the dataset info.
        num_examples=-1,
    ))
    c.batch_size = 2048  # global: 256 per GPU x 8 GPUs in the official launch
    c.epochs = 800
    c.total_steps = 0  # > 0 wins over epochs; 0 = epochs x num_examples // batch_size
    c.log_every_steps = 50
    c.init_from = ""  # "" | pre-training workdir | exported .safetensors | official MAE / XA-SSL .pth

    c.model = model_config("b", 16, 224, in_chans=3)

    c.input = config_dict.ConfigDict(dict(
        crop_scale=(0.2, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        hflip_prob=0.5,
        num_workers=0,  # grain worker processes; 0 = decode in the main process (threads only)
        num_threads=8,  # grain reader threads per process (PNG decode and PIL resize release the GIL)
        worker_buffer_size=2,
        prefetch_batches=2,
    ))

    c.masking = config_dict.ConfigDict(dict(
        mask_ratio=0.5,  # official launch script; 0.75 is only the argparse default
        beta_start=0.0,
        beta_end=0.5,
        beta_per="epoch",  # "epoch" as the official code (beta_e uses (e+1)/E), or "step"
        # Guidance G = map_weight * stored map + (1 - map_weight) * vesselness(image). The official code's 0.5
        # co-guidance used a learned segmentor for the second term; ours is the differentiable filter.
        map_weight=1.0,
        guidance_filter="frangi",  # vesselness used when map_weight < 1: "frangi" | "sato"
        guidance_sigmas=(1.0, 2.0, 3.0, 4.0),  # scales of that vesselness
        # A patch "contains vessel" for vessel_share when its vessel-pixel fraction exceeds this.
        vessel_patch_min_fraction=0.0,
    ))

    c.loss = config_dict.ConfigDict(dict(
        norm_pix_loss=True,
        unbiased_var=True,  # torch.var default in the official MAE
        consistency_weight=1.0,  # lambda
        consistency_distance="bce",  # "bce" (logged in its KL form) | "l1"
        frangi_sigmas=(1.0, 2.0, 3.0, 4.0),
        frangi_alpha=0.5,
        frangi_beta=0.5,
        paste_visible=False,  # official: the whole reconstruction goes through the filter
    ))

    c.optim = config_dict.ConfigDict(dict(
        base_lr=1.5e-4,  # lr = base_lr * batch_size / 256
        lr=-1.0,  # > 0 overrides the scaled lr
        min_lr=0.0,
        warmup_fraction=0.05,  # 40 / 800 epochs
        b1=0.9,
        b2=0.95,
        weight_decay=0.05,
        # The official param groups decay the 1x1xD cls / mask tokens (they are not 1-D); biases and norms not.
        decay_tokens=True,
        grad_accum_steps=1,
        clip_grad_norm=0.0,  # 0 = off (official: off)
    ))

    c.checkpoint = config_dict.ConfigDict(dict(
        every_steps=1000,
        max_to_keep=3,
    ))

    # Device mesh: one size may be -1 (all remaining devices).
    c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1))
    c.sharding = config_dict.ConfigDict(dict(
        # (regex on the '/'-joined parameter path, rule): "fsdp" shards the largest dimension divisible by the
        # fsdp axis size when the parameter has at least `min_fsdp_size` elements; "replicate" never shards.
        rules=(("cls_token|mask_token", "replicate"), (".*", "fsdp")),
        min_fsdp_size=2**14,
    ))
    c.distributed = config_dict.ConfigDict(dict(
        # "auto": initialise jax.distributed on TPU pods / SLURM / when JAX_COORDINATOR_ADDRESS is set.
        initialize="auto",
        coordinator_address="",
        num_processes=-1,
        process_id=-1,
    ))
    c.metrics = config_dict.ConfigDict(dict(
        peak_tflops_per_device=0.0,  # for MFU; 0 = look up the device kind, unknown -> MFU not shown
        tensorboard=True,
        panels_every_steps=0,  # 0 = off
    ))
    return c


def finetune_config(task: str = "segmentation"):
    """Downstream fine-tuning (owner: finetune): ViT-B/16 encoder + UNETR decoder (segmentation) or a linear head
    on the cls feature (classification). Mesh / sharding / distributed / metrics as pre-training."""
    base = pretrain_config()
    c = config_dict.ConfigDict()
    c.seed = 0
    c.task = task  # "segmentation" | "classification"
    c.dataset = config_dict.ConfigDict(dict(
        name="",  # a vessel_seg_folder / arcade build (segmentation) or a class_folder build (classification)
        data_dir="",
        split="train",  # TFDS split strings slice, e.g. "train[:32]" / "train[32:]" for a fixed fold
        eval_split="test",
        image_key="image",
        mask_key="mask",  # arcade: "vessel_mask" for vessels
        fov_key="",  # "" = no field-of-view masking at evaluation; "fov" for vessel_seg_folder builds with one
        label_key="label",
    ))
    c.batch_size = 16
    c.total_steps = 2000
    c.log_every_steps = 20
    c.eval_every_steps = 500
    c.init_from = ""  # "" = random init | pre-training workdir | exported .safetensors | official .pth
    c.init_step = -1  # checkpoint step of a workdir init_from; -1 = latest
    c.model = model_config("b", 16, 224, in_chans=3)
    c.drop_path_rate = 0.1
    c.decoder = config_dict.ConfigDict(dict(features=16))  # UNETR feature size (channels at full resolution)
    c.num_classes = 1  # segmentation: 1 = binary vessel logit; classification: the number of labels
    c.linear_probe = False  # classification: frozen encoder, train the head only
    c.input = config_dict.ConfigDict(dict(
        hflip_prob=0.5,
        rotate_deg=10.0,  # uniform in [-rotate_deg, rotate_deg]
        scale=(0.9, 1.1),
        brightness=0.1,  # additive, fraction of 255
        contrast=0.1,  # multiplicative around the mean: 1 +- contrast
        num_workers=0,
        num_threads=2,
        worker_buffer_size=2,
        prefetch_batches=2,
    ))
    c.loss = config_dict.ConfigDict(dict(dice_weight=1.0, bce_weight=1.0))
    c.optim = config_dict.ConfigDict(dict(
        base_lr=5e-4,  # lr = base_lr * batch_size / 256 (MAE fine-tuning rule)
        lr=-1.0,  # > 0 overrides the scaled lr
        min_lr=1e-6,
        warmup_fraction=0.05,
        b1=0.9,
        b2=0.999,
        weight_decay=0.05,
        layer_decay=0.75,
        clip_grad_norm=0.0,
        grad_accum_steps=1,
    ))
    c.eval = config_dict.ConfigDict(dict(
        threshold=0.5,  # on the sigmoid probability
        batch_size=8,  # rounded up to a multiple of the device count
        save_predictions=False,  # `vasomim evaluate`: prediction PNGs in WORKDIR/eval/<dataset>_<split>/
    ))
    c.checkpoint = config_dict.ConfigDict(dict(every_steps=500, max_to_keep=2))
    c.mesh = base.mesh
    c.sharding = base.sharding
    c.distributed = base.distributed
    c.metrics = config_dict.ConfigDict(dict(tensorboard=True))
    return c
