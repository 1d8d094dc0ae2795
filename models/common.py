"""What every model family in the zoo shares: the hook that wraps repeated blocks."""

from collections.abc import Callable

import flax.linen as nn

BlockWrapper = Callable[[type[nn.Module]], type[nn.Module]]
"""A class transform applied to each repeated block, e.g. `nn.remat` or `jact.compressed`."""


def wrap(block_cls: type[nn.Module], wrap_block: BlockWrapper | None) -> type[nn.Module]:
  """Returns `block_cls` transformed by `wrap_block`, or unchanged when it is None.

  Models call this once per block class, so a memory policy (remat, compression) is chosen by the
  caller without changing model code. Blocks keep their flags (`train`, strides) as module
  attributes and take only arrays in `__call__`, so any lifted transform applies as is.
  """
  return block_cls if wrap_block is None else wrap_block(block_cls)
