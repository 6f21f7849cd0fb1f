"""The one command line: ``vasomim <subcommand> [--flags]``.

Each subcommand lives in the module that owns the capability; that module defines ``define_flags()`` (absl
flags, registered only when the subcommand runs, so each ``--help`` lists just its own options) and
``main(argv)``. absl parses the flags, which also makes grain's multiprocess prefetch happy (it reads absl flags).
"""

from __future__ import annotations

import importlib
import sys
import textwrap

# name -> (one-line help, implementing module)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("Build a TFDS dataset (array_record shards with precomputed vessel maps) from a folder.",
                "vasomim_jax.convert"),
    "pretrain": ("Pre-train a VasoMIM / MAE ViT from a config file (sharded, checkpointed, resumable).",
                 "vasomim_jax.train"),
    "finetune": ("Fine-tune a pre-trained encoder for vessel segmentation or classification.",
                 "vasomim_jax.finetune.train"),
    "evaluate": ("Score a fine-tuned checkpoint (Dice, clDice) on any segmentation split.",
                 "vasomim_jax.finetune.evaluate"),
    "export": ("Export a checkpoint to PyTorch: timm encoder or official-MAE full model.", "vasomim_jax.export"),
    "visualize": ("Draw masking / reconstruction panels and training plots from a workdir.",
                  "vasomim_jax.visualize"),
    "demo": ("Run the end-to-end demo on synthetic angiograms (outputs in demo_out/).", "vasomim_jax.demo"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: vasomim <subcommand> [--flags]   (vasomim <subcommand> --help for its options)", "",
             "VasoMIM in JAX: anatomy-aware masked image modeling for X-ray angiograms.", "", "subcommands:"]
    for name, (text, _) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def _subcommand_help(name: str, module) -> str:
    from absl import flags

    text, _ = SUBCOMMANDS[name]
    doc = textwrap.dedent(module.__doc__ or "").strip()
    flag_help = flags.FLAGS.module_help(module.__name__) or "  (no flags)"
    return f"usage: vasomim {name} [--flags]\n\n{text}\n\n{doc}\n\nflags:\n{flag_help}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    name, rest = argv[1], argv[2:]
    if name not in SUBCOMMANDS:
        print(f"vasomim: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][1])
    module.define_flags()
    if any(a in ("-h", "--help", "-help") for a in rest):
        print(_subcommand_help(name, module))
        return 0
    from absl import app

    try:
        app.run(module.main, argv=[f"vasomim {name}", *rest])
    except SystemExit as e:  # absl exits through SystemExit; hand the code back to the console script
        return int(e.code or 0) if not isinstance(e.code, str) else (print(e.code, file=sys.stderr) or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
