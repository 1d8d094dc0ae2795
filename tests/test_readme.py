"""The README's training loops (Flax linen and NNX, Equinox, Haiku) run as written and train
(the README must stay true)."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
  text = README.read_text()
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else None]


def test_training_loops_in_the_readme_train():
  blocks = [block for title in ("Flax", "Equinox", "Haiku")
            for block in re.findall(r"```python\n(.*?)```", section(title), re.S)]
  assert len(blocks) == 4  # linen, NNX, Equinox, Haiku (the later ones reuse the first's data)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    namespace = {}
    for block in blocks:
      exec(compile(block, str(README), "exec"), namespace)
  accuracies = dict(re.findall(r"(linen|nnx|equinox|haiku), 4 bits: test accuracy ([\d.]+)", printed.getvalue()))
  assert set(accuracies) == {"linen", "nnx", "equinox", "haiku"}, printed.getvalue()
  # Uncompressed, each reaches about 0.95 on the last 297 digits; chance is 0.10.
  assert all(float(a) > 0.9 for a in accuracies.values()), accuracies
