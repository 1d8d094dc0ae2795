"""The tangent map of a compressed call: one primitive, evaluated exactly, transposed compressed.

A compressed call is a `jax.custom_jvp` (see `jact._vjp`). Its JVP rule runs the forward rule
(outputs, and the residuals stored compressed) and returns as output tangents
`tangent_p(stored, inputs, input tangents)`, a primitive linear in the input tangents:

- **evaluated** (forward mode: `jax.jvp`, `jax.jacfwd`, applying `jax.linearize`'s function),
  it is the exact JVP of the uncompressed function at the call's inputs;
- **transposed** (reverse mode: `jax.grad`, `jax.vjp`), it is the compressed backward pass, which
  reads the stored residuals and not the inputs -- so a gradient step drops the inputs (XLA
  keeps nothing that nothing reads) and stores only the compressed residuals;
- **differentiated** (the derivative of an evaluation: forward over forward, reverse over
  forward), its derivative in the inputs is the exact second derivative.

Because every rule is a primitive rule, this holds through `jit`, `vmap`, `scan`, `cond` and
`jax.checkpoint` alike: JAX applies the rules wherever the call sits. The operations behind the
rules are the `Call` methods `exact_jvp` and `backward` (see `jact._vjp.Traced`).

Batching: each `vmap` around the primitive adds a level to `batched` -- the operands' batch axes
(None for an operand not batched) and the size -- and every rule applies its function under the
same `jax.vmap`s. Input tangents are always batched at axis 0, so that a transposed level's
cotangents come out batched at 0 too.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


class Call(Protocol):
  """What the primitive needs of a compressed call (`jact._vjp.Traced` with one plan)."""

  def exact_jvp(self, inputs: list, tangents: list) -> list:
    """Tangents of the float outputs for tangents of the float inputs, uncompressed."""

  def backward(self, plan: Any, stored: list, inputs: list | None, cts: list) -> list:
    """Cotangents of the float inputs for cotangents of the float outputs, from `stored`."""

  def tangent_avals(self) -> list:
    """Shapes and dtypes of the float outputs."""


tangent_p = Primitive("jact_tangent")
tangent_p.multiple_results = True


def bind(call: Call, plan: Any, stored: Sequence[Any], inputs: Sequence[Any] | None,
         tangents: Sequence[Any]) -> list[Any]:
  """The output tangents of `call` for input `tangents` (those of its float inputs)."""
  leaves, tree = jax.tree.flatten(list(stored))
  # `plan` carries whether the inputs were handed over (None: the call is part of an enclosing
  # one, which evaluates and differentiates itself).
  given = () if inputs is None else tuple(inputs)
  return tangent_p.bind(*leaves, *given, *tangents, call=call, plan=(plan, tree, inputs is not None),
                        num_stored=len(leaves), num_inputs=len(given), batched=())


def _split(args, num_stored, num_inputs):
  return list(args[:num_stored]), list(args[num_stored:num_stored + num_inputs]), list(args[num_stored + num_inputs:])


def _vmapped(fn: Callable, levels: Sequence[tuple]) -> Callable:
  """`fn` under one `jax.vmap` per batching level (innermost first), outputs batched at 0."""
  for axes in levels:
    fn = jax.vmap(fn, in_axes=axes, out_axes=0)
  return fn


def _impl(*args, call, plan, num_stored, num_inputs, batched):
  if not plan[2]:
    raise TypeError("jact internal error: forward-mode evaluation of a compressed call that is "
                    "part of an enclosing one (the enclosing call evaluates its own).")

  def exact(*args):
    _, inputs, tangents = _split(args, 0, num_inputs)
    return call.exact_jvp(inputs, tangents)

  return _vmapped(exact, [axes[num_stored:] for axes, _ in batched])(*args[num_stored:])


def _abstract_eval(*avals, call, plan, num_stored, num_inputs, batched):
  if not batched:
    return [a.to_tangent_aval() for a in call.tangent_avals()]
  sizes = tuple(size for _, size in reversed(batched))  # outermost first
  return [jax.core.ShapedArray(sizes + tuple(a.shape), a.dtype) for a in call.tangent_avals()]


def _transpose(cts, *args, call, plan, num_stored, num_inputs, batched):
  stored, inputs, tangents = _split(args, num_stored, num_inputs)
  # (A tangent that is a constant -- zeros for an input not differentiated -- gets no cotangent.)
  cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]

  def backward(*args):
    stored, inputs, cts = _split(args, num_stored, num_inputs)
    plan_of_call, tree, have_inputs = plan
    return call.backward(plan_of_call, jax.tree.unflatten(tree, stored), inputs if have_inputs else None, cts)

  levels = [axes[:num_stored + num_inputs] + (0,) * len(cts) for axes, _ in batched]
  grads = _vmapped(backward, levels)(*stored, *inputs, *cts)
  return [None] * (num_stored + num_inputs) + [g if ad.is_undefined_primal(t) else None
                                               for g, t in zip(grads, tangents)]


def _batch(args, dims, *, call, plan, num_stored, num_inputs, batched):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args, dims = list(args), list(dims)
  for k in range(num_stored + num_inputs, len(args)):  # input tangents: batched at 0
    args[k], dims[k] = batching.bdim_at_front(args[k], dims[k], size), 0
  axes = tuple(d for d in dims)
  outs = tangent_p.bind(*args, call=call, plan=plan, num_stored=num_stored, num_inputs=num_inputs,
                        batched=batched + ((axes, size),))
  return outs, [0] * len(outs)


def _jvp(primals, tangents, *, call, plan, num_stored, num_inputs, batched):
  params = dict(call=call, plan=plan, num_stored=num_stored, num_inputs=num_inputs, batched=batched)
  outs = tangent_p.bind(*primals, **params)
  stored, inputs, input_tangents = _split(primals, num_stored, num_inputs)
  _, d_inputs, d_tangents = _split(tangents, num_stored, num_inputs)
  terms = []
  if any(type(t) is not ad.Zero for t in d_tangents):  # linear in the tangents
    terms.append(tangent_p.bind(*stored, *inputs, *[ad.instantiate_zeros(t) for t in d_tangents], **params))
  if any(type(t) is not ad.Zero for t in d_inputs):  # the exact second derivative in the inputs
    d_inputs = [ad.instantiate_zeros(t) for t in d_inputs]

    def second(*args):
      inputs, rest = args[:num_inputs], args[num_inputs:]
      input_tangents, d_inputs = rest[:len(rest) - num_inputs], rest[len(rest) - num_inputs:]
      return jax.jvp(lambda *xs: call.exact_jvp(list(xs), list(input_tangents)), tuple(inputs), tuple(d_inputs))[1]

    levels = [axes[num_stored:num_stored + num_inputs] + (0,) * len(input_tangents)
              + axes[num_stored:num_stored + num_inputs] for axes, _ in batched]
    terms.append(list(_vmapped(second, levels)(*inputs, *input_tangents, *d_inputs)))
  if not terms:
    return outs, [ad.Zero.from_primal_value(o) for o in outs]
  return outs, [sum(term) for term in zip(*terms)]


tangent_p.def_impl(_impl)
tangent_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(tangent_p, mlir.lower_fun(_impl, multiple_results=True))
ad.primitive_transposes[tangent_p] = _transpose
ad.primitive_jvps[tangent_p] = _jvp
batching.primitive_batchers[tangent_p] = _batch


def is_float(x: Any) -> bool:
  """Whether `x` (a value or a dtype) is floating: has tangents (not ints, bools or PRNG keys)."""
  if hasattr(x, "dtype"):
    dtype = x.dtype
  elif isinstance(x, (bool, int, float, complex)):
    dtype = jnp.result_type(x)
  else:
    dtype = x  # a dtype
  return not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) and jnp.issubdtype(dtype, jnp.inexact)


def float0_zeros(x: Any) -> np.ndarray:
  return np.zeros(np.shape(x), jax.dtypes.float0)
