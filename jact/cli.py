"""The `jact` command line: `jact demo`."""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jact", description="Activation Compressed Training for JAX and Flax.")
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="calibrate, train and measure an MLP on scikit-learn digits with and "
                              "without compression")
  demo.add_argument("--steps", type=int, default=400, help="training steps per variant (default 400)")
  demo.add_argument("--memory-batch", type=int, default=4096,
                    help="batch size at which memory is measured, from abstract shapes (default 4096)")
  demo.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("results/jact-demo.png"),
                    help="where to save the plot of loss curves and memory (default results/jact-demo.png)")
  args = parser.parse_args(argv)
  if args.steps <= 0 or args.memory_batch <= 0:
    parser.error("--steps and --memory-batch must be positive")
  from jact import demo as demo_lib
  demo_lib.main(steps=args.steps, memory_batch=args.memory_batch, plot_path=args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
