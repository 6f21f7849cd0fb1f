"""Downstream fine-tuning: vessel segmentation (ViT + UNETR decoder, Dice + BCE) and classification (linear
probe / full fine-tuning), layer-wise lr decay, drop-path, Dice / clDice, `vasomim finetune` / `vasomim evaluate`.

Modules: `seg_metrics` (dice, cldice), `cls_metrics` (accuracy, auc), `encoder` (MAE encoder + drop-path),
`heads` (UNETRDecoder, SegmentationModel, ClassificationModel), `optim` (layer decay), `data` (augmented
batches, native-resolution evaluation reader), `task` (model / init / loss / predict), `train` (the loop,
`vasomim finetune`), `evaluate` (`vasomim evaluate`).
"""
