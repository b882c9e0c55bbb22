"""``lyco train``: train an adapter from a TOML config; every config key is also a flag."""

from __future__ import annotations

import sys

from ..cli import command


@command("train", "train an adapter (LoRA, LoCon, LoHa, LoKr, DoRA, OFT, Full, …) on an SD1/SD2/SDXL model",
         "lyco train examples/train_lokr.toml\n"
         "  lyco train examples/train_lokr.toml --lr 5e-4 --max-train-steps 2000 --output-dir out/run2\n"
         "  lyco train examples/train_lokr.toml --resume out/run2          # newest state in that folder\n"
         "  lyco train --print-config > my.toml                            # every option, commented\n"
         "  accelerate launch --num_processes 2 -m lyco train my.toml      # DDP")
def _train():
    def add(p):
        from .config import add_flags
        p.add_argument("config", nargs="?", help="TOML config file (omit to use flags and defaults only)")
        p.add_argument("--resume", metavar="DIR", help="continue from a training state folder, or the newest "
                       "state in an output folder (same config)")
        p.add_argument("--print-config", action="store_true",
                       help="print the effective configuration as a commented TOML file and exit")
        add_flags(p)

    def run(a):
        from .config import check_runnable, commented_toml, flags_from_args, load
        cfg = load(a.config, flags_from_args(a))
        if a.print_config:
            print(commented_toml(cfg))
            return 0
        check_runnable(cfg)
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from .loop import Trainer
        trainer = Trainer(cfg, resume=a.resume)
        res = trainer.train()
        if trainer.accelerator.is_main_process:
            first = res.eval_losses[0][1] if res.eval_losses else None
            last = res.eval_losses[-1][1] if res.eval_losses else None
            print(f"\ntrained {res.steps} steps ({res.epochs} epochs) in {res.seconds:.1f}s")
            if first is not None:
                print(f"fixed-batch eval loss: {first:.5f} -> {last:.5f}")
            print(f"adapter:    {res.adapter_path}")
            if res.sample_grids:
                print(f"samples:    {res.sample_grids[-1]}")
            if res.loss_curve:
                print(f"loss curve: {res.loss_curve}")
            print(f"config:     {trainer.config_path}")
            if res.states:
                print(f"state:      {res.states[-1]}")
                print(f"continue:   lyco train {trainer.config_path} --resume {cfg.output.output_dir} "
                      f"--max-train-steps N")
        sys.stdout.flush()
        return 0
    return add, run
