"""`remat_compress`: store a function's autodiff residuals compressed.

The public entry point: it checks its options, flattens a call's arguments into leaves of known
kinds (parameters, index inputs, activations), traces the function and hands the call to its
`jact._vjp.Traced`, whose custom_jvp stores the residuals compressed. How a plan is built and run
lives in `jact._plan`, `jact._classify`, `jact._schedule` and `jact._loops`
(`docs/architecture.md` has the map).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jact import _context, _haiku, _jaxpr, _naming, _options, _vjp, policies
from jact._classify import InputKind, input_kind
from jact._options import DEFAULT_GROUP_SIZE, DEFAULT_MIN_SIZE, Options  # noqa: F401  (re-exported)
from jact.codec import hashing


@_options.takes_options()
def remat_compress(fun: Callable | None = None, bits: policies.BitsOrPolicy = 2, **options: Any) -> Callable:
  """Makes `fun` store its autodiff residuals compressed, like `jax.checkpoint` makes it recompute them.

  `remat_compress(f)(*args)` computes the same value as `f(*args)`. When it is differentiated in
  reverse mode (`jax.grad`, `jax.vjp`, ...), every residual that the forward pass of `f` hands to
  its backward pass -- the values autodiff keeps alive between the two -- is stored quantised to
  `bits` per value (per-group scale, stochastic rounding by default, so gradients stay unbiased)
  and restored just before the backward pass needs it. There is no per-operation code: whatever
  primitives `f` uses, their residuals are covered.

  What is never compressed: arguments listed in `keep_argnums` (parameters: they are alive anyway),
  values `f` closes over, values computed from those alone, constants, non-float residuals,
  residuals with fewer than `min_size` elements, residuals the backward pass uses non-polynomially,
  and per-row statistics (residuals whose innermost axis has extent 1, such as a softmax's
  normaliser: a group would span rows of unrelated scales). Masks -- residuals that provably take
  two values which 1-bit codes represent exactly, such as a ReLU's derivative -- are stored at
  1 bit whatever `bits` says (unless 32), without error.

  Example::

    def layer(x, w):
      return jax.nn.gelu(x @ w)

    layer = jact.remat_compress(layer, bits=2, keep_argnums=(1,))
    loss = lambda w, x: jnp.sum(layer(x, w) ** 2)
    grads = jax.grad(loss)(w, x)          # residuals of `layer` stored at 2 bits
    print(jact.residuals(loss, w, x))     # which residuals, at which width, how many bytes

  Costs: one quantise pass over each residual in the forward pass and one dequantise pass in the
  backward pass, no recomputation. Memory: a residual at b bits takes b/32 of its float32 bytes
  plus 4 bytes per group. Wrap each layer (or block) separately: memory falls when the
  full-precision residuals of one wrapped call die before the next call runs.

  With `recompute=True` it makes jax.checkpoint's trade at a fraction of its memory: only the
  inputs are stored (compressed), and the backward pass recomputes `fun` from them, compressing
  the recomputed residuals too, so that neither the stored inputs nor the backward pass's working
  set is full precision. It costs one extra forward pass, like `jax.checkpoint`. The recomputed
  forward starts from the decoded inputs, so its gradient is the gradient at a point within the
  codec's error of the input: not unbiased, as the default mode is.

  Composes with `jit`, `grad`, `vmap`, `lax.scan` and `jax.checkpoint`. A `lax.scan` inside `fun`
  whose residuals would be compressed runs with its body compressed on its own, so that each step
  quantises its residuals (the loop would otherwise stack them at full precision first).
  Every transformation composes, in any order and through `jit`, `vmap`, `scan`, `cond` and
  `jax.checkpoint`: forward mode (`jvp`, `jacfwd`, `jax.linearize`) gives the exact JVP (the
  tangent is evaluated from the call's full-precision inputs; forward mode keeps no residuals);
  when the backward pass itself is differentiated (`grad` of `grad`, `jax.hessian`,
  Hessian-vector products, a gradient penalty) its derivative is the exact one, from the same
  inputs, and the first-order values keep their (unbiased) rounding noise. Only reverse mode reads
  the compressed residuals, and only higher orders keep the inputs (see `jact._tangent`).

  Arguments: leaves that are not arrays (functions, strings, Python bools and ints) are passed
  as they are, like `static_argnums`; arrays and Python floats are traced. Repeated calls in one
  traced computation get distinct residual scopes (`name`, `name_1`, ...) unless `name` is given.

  Args:
    fun: the function to wrap; its arguments and outputs may be pytrees of arrays.
    bits: an int (1, 2, 4, 8, 16, 32; None means 32) or a policy (`jact.policies`), which chooses a
      width per residual from its `jact.ResidualInfo`.
    {options}

  Returns:
    A function with the signature of `fun` plus an optional keyword argument `rng` (a
    `jax.random` key or an int) that selects the rounding noise. Without `rng` the noise is a
    hash of each residual's own values: the same inputs give bitwise the same gradients, and new
    inputs get new noise.
  """
  checked = Options.create(bits, **options)
  if fun is None:
    return functools.partial(remat_compress, **checked.user_options())
  if not callable(fun):
    raise TypeError(f"remat_compress expects a callable, got {type(fun).__name__}.")
  return compress_with(fun, checked)


def compress_with(fun: Callable, options: Options) -> Callable:
  """`remat_compress(fun, ...)` with its options already checked."""
  options = dataclasses.replace(options, name=options.name or getattr(fun, "__name__", type(fun).__name__))
  if options.recompute:
    # Store only the inputs of `fun`, compressed even though the recomputation uses them
    # nonlinearly; in the backward pass jax.checkpoint reruns the compressed `fun`, whose
    # recomputed residuals take the names of the call that stores the inputs.
    inner_options = dataclasses.replace(options, recompute=False, numbered=False, name_from_caller=True)
    inner = functools.wraps(fun)(jax.checkpoint(compress_with(fun, inner_options),
                                                static_argnums=options.static_argnums))
    return _compressed_call(inner, dataclasses.replace(options, recompute=False, compress_nonlinear=True))
  return _compressed_call(fun, options)


def _compressed_call(fun: Callable, options: Options) -> Callable:
  """`fun` calling through the `Traced` of its function at every call."""
  base_scope = options.name

  @functools.wraps(fun)
  def wrapped(*args, rng=None, **kwargs):
    for a in options.static_argnums + options.keep_argnums:
      if a >= len(args):
        raise ValueError(f"argnum {a} in keep_argnums/static_argnums of {base_scope!r}, but it was "
                         f"called with {len(args)} positional arguments.")
    names = _arg_names(fun, len(args))
    dynamic = [i for i in range(len(args)) if i not in options.static_argnums]
    path_leaves, in_tree = jax.tree_util.tree_flatten_with_path(([args[i] for i in dynamic], kwargs))
    # Leaves that are not arrays (functions, strings, Python bools and ints) are static, as
    # Equinox's filter_jit treats them: they are closed over, not traced.
    traced_at = [j for j, (_, leaf) in enumerate(path_leaves) if _is_traced_leaf(leaf)]
    leaves = [path_leaves[j][1] for j in traced_at]
    static_leaves = tuple((j, type(leaf), leaf) for j, (_, leaf) in enumerate(path_leaves) if not _is_traced_leaf(leaf))
    kinds, labels = [], []
    for path, leaf in (path_leaves[j] for j in traced_at):
      top = path[0].idx if hasattr(path[0], "idx") else 1
      if top == 0:  # a positional argument
        position = dynamic[path[1].idx]
        labels.append("/".join([names[position]] + [_key_label(p) for p in path[2:]]))
        kinds.append(input_kind(leaf, position in options.keep_argnums))
      else:
        labels.append("/".join(_key_label(p) for p in path[1:]))
        kinds.append(input_kind(leaf, False))
    if options.name_from_caller:
      scope = _naming.caller_scope()
    else:
      scope = "/".join(_jaxpr.current_scope() + [base_scope])
      scope = _naming.numbered(scope) if options.numbered else scope
    override = _context.current().policy
    static = (tuple(args[i] for i in options.static_argnums), static_leaves)
    key = _trace_key(in_tree, leaves, static, scope, override)
    entry = _EAGER_TRACES.get((wrapped_id, key)) if key is not None else None
    if entry is None:
      out_tree = []

      def flat_fun(*traced_leaves):
        all_leaves = [leaf for _, leaf in path_leaves]
        for j, leaf in zip(traced_at, traced_leaves):
          all_leaves[j] = leaf
        dyn, kw = jax.tree.unflatten(in_tree, all_leaves)
        full = list(args)
        for i, value in zip(dynamic, dyn):
          full[i] = value
        with _naming.calling(scope):
          outs, tree = jax.tree.flatten(fun(*full, **kw))
        out_tree.append(tree)
        return outs

      haiku_values = _haiku.values_in_frame()
      try:
        fun_jaxpr = jax.make_jaxpr(flat_fun)(*leaves)
      except jax.errors.ConcretizationTypeError as error:  # (TracerBool/IntegerConversionError too)
        raise _concretization_error(base_scope, error, path_leaves, traced_at, labels) from error
      _haiku.check_no_leak(haiku_values, scope)
      consts = list(fun_jaxpr.consts)
      call_options = options if override is None else dataclasses.replace(options, policy=override)
      traced = _vjp.traced_for(fun_jaxpr.jaxpr, len(consts), [InputKind.KEPT] * len(consts) + kinds,
                               [f"closure{i}" for i in range(len(consts))] + labels, scope, call_options)
      entry = _Trace(traced, consts, out_tree[0])
      if key is not None and not any(isinstance(c, jax.core.Tracer) for c in consts):
        _remember((wrapped_id, key), entry)
    traced, consts, out_tree = entry
    outs = traced.call(_seed_from(rng), list(consts) + leaves)
    return jax.tree.unflatten(out_tree, outs)

  wrapped_id = object()  # this wrapper's part of the keys of _EAGER_TRACES
  return wrapped


def _concretization_error(name: str, error: Exception, path_leaves, traced_at, labels) -> TypeError:
  """A clear error for a traced argument that the function needs as a Python value."""
  scalars = [label for j, label in zip(traced_at, labels) if isinstance(path_leaves[j][1], (float, complex))]
  which = (f"its Python number argument(s) {', '.join(scalars)} are traced" if scalars
           else f"its array arguments ({', '.join(labels)}) are traced")
  return TypeError(
      f"{name}: the function needs a concrete Python value (for an `if`, a shape or an index) but "
      f"{which}. Pass such an argument through static_argnums (arrays and Python floats are "
      f"traced; Python bools, ints, strings and functions are static by themselves). JAX said: "
      f"{str(error).splitlines()[0]}")


def _is_traced_leaf(leaf: Any) -> bool:
  """Whether an argument leaf is traced: arrays (JAX, NumPy, tracers) and Python floats and
  complex numbers. Everything else -- functions, strings, Python bools and ints, other objects --
  is passed to the function as it is."""
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, complex, jax.core.Tracer)) \
      or hasattr(leaf, "__jax_array__")


# --- traces of eager calls -----------------------------------------------------------------------

class _Trace(NamedTuple):
  """A traced call: its `Traced`, the constants its jaxpr closed over and its output tree."""
  traced: _vjp.Traced
  consts: list[Any]
  out_tree: Any


_EAGER_TRACES: collections.OrderedDict = collections.OrderedDict()
_EAGER_TRACES_CAPACITY = 512


def _trace_key(in_tree, leaves, static: tuple, scope: str, override) -> tuple | None:
  """The key under which a call's trace is reused, like `jax.jit`'s cache: the argument tree, the
  leaves' types, static arguments and non-array leaves by value, the name scope and a `use_policy` in force. None for
  a call under a transformation (tracers among the leaves: the enclosing trace is what is cached)
  or with unhashable static arguments."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return None
  key = (in_tree, tuple(jax.typeof(leaf) for leaf in leaves), tuple(static), scope, override)
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _remember(key, entry: _Trace) -> None:
  _EAGER_TRACES[key] = entry
  if len(_EAGER_TRACES) > _EAGER_TRACES_CAPACITY:
    _EAGER_TRACES.popitem(last=False)


def clear_caches() -> None:
  """Forgets every trace and plan jact keeps for reuse (eager calls' traces, shared plans and
  their compiled rules): for long-lived processes that trace many different functions."""
  _EAGER_TRACES.clear()
  _vjp.clear_cache()


def _seed_from(rng) -> jax.Array:
  """The call's rounding seed from its `rng` argument (a key, key data or an int)."""
  if rng is None:
    return jnp.uint32(0)
  if isinstance(rng, (int, np.integer)):
    return jnp.uint32(rng)
  rng = jnp.asarray(rng) if not hasattr(rng, "dtype") else rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if not jnp.issubdtype(rng.dtype, jnp.integer):
    raise TypeError(f"rng must be a jax.random key, raw uint32 key data or an int; got dtype {rng.dtype}.")
  seed = jnp.uint32(0)
  for word in rng.astype(jnp.uint32).reshape(-1):
    seed = hashing.fmix32(seed ^ word)
  return seed


def _arg_names(fun: Callable, num_args: int) -> list[str]:
  """Names of the first `num_args` positional parameters of `fun` (`arg<i>` where unknown)."""
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    params = []
  names = []
  for i in range(num_args):
    if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
      names.append(params[i].name)
    else:
      names.append(f"arg{i}")
  return names


def _key_label(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)
