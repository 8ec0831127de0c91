"""Grad-CAM for segmentation models (Selvaraju et al. 2017; for segmentation
as in Vinogradova et al. 2020), 2D and 3D, and a heat-map overlay.

A layer is named by the module path of a Flax submodule, '/'-separated:
'enc_2' (a U-Net encoder block), 'dec_0/conv2' (a conv inside a decoder
block), 'X_0_3' (UNet++). `feature_layer_names(model, variables, image)`
lists the names whose output is a feature map `[B, *spatial, C]`.

The models need no change: the layer's output is intercepted
(`flax.linen.intercept_methods`) and a zero perturbation is added to it, so
the gradient of the target score with respect to that perturbation is the
gradient with respect to the feature map (what `Module.perturb` does, without
editing the model).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from medseg_jax import inference


def _path_name(path: Sequence[str]) -> str:
  return '/'.join(path)


def _batched_input(image) -> jax.Array:
  image = np.asarray(image, np.float32)
  if image.ndim not in (3, 4):
    raise ValueError(f'Grad-CAM expects one channels-last case [H, W, C] or '
                     f'[D, H, W, C]; got shape {image.shape}.')
  return jnp.asarray(image[None])


def feature_layer_names(model, variables, image) -> list[str]:
  """Returns the layers usable by `grad_cam`, in call order.

  Args:
    model: a Flax module.
    variables: its variables.
    image: `[*spatial, C]`, one case (only its shape matters; traced, not
      run), spatial sizes divisible by `inference.input_divisor(model)`.

  Returns:
    Names ('/'-separated module paths, e.g. 'enc_1', 'dec_0/conv2') of the
    submodules whose output has the input's rank, `[B, *spatial', C']`, in
    the order the forward pass calls them (the same interception as
    `grad_cam`, so every name listed works there).
  """
  x = _batched_input(image)
  names = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = _path_name(context.module.path)
    if (context.method_name == '__call__' and name and name not in names and
        getattr(out, 'ndim', 0) == x.ndim):
      names.append(name)
    return out

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, x)
  return names


def _intercepting(layer: str, delta, captured: dict):
  """Returns an interceptor adding `delta` to `layer`'s output (recorded)."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == '__call__' and
        _path_name(context.module.path) == layer):
      if 'value' in captured:
        raise ValueError(f'Grad-CAM: layer {layer!r} is called more than once '
                         'in a forward pass; pick another layer.')
      if delta is not None:
        out = out + delta.astype(out.dtype)
      captured['value'] = out
    return out

  return interceptor


def _layer_shape(model, variables, x, layer: str) -> jax.ShapeDtypeStruct:
  def run(v, x):
    captured = {}
    with nn.intercept_methods(_intercepting(layer, None, captured)):
      model.apply(v, x, train=False)
    return captured.get('value')

  shape = jax.eval_shape(run, variables, x)
  if shape is None or getattr(shape, 'ndim', 0) != x.ndim:
    names = feature_layer_names(model, variables, x[0])
    raise ValueError(f'Grad-CAM: {layer!r} is not a feature-map layer of '
                     f'{type(model).__name__}; choose one of: '
                     f'{", ".join(names)}.')
  return shape


def _target_mask(logits, target_class: int, threshold: float):
  """Returns the pixels predicted as `target_class` (all if there are none)."""
  probs = inference.probabilities(logits)
  if probs.shape[-1] == 1:
    mask = probs[..., 0] > threshold
  else:
    mask = jnp.argmax(probs, axis=-1) == target_class
  return jnp.where(mask.any(), mask, jnp.ones_like(mask)).astype(jnp.float32)


def grad_cam(model, variables, image, layer: str,
             target_class: int | None = None, mask=None,
             threshold: float = 0.5) -> np.ndarray:
  """Returns the Grad-CAM heat map `[*spatial]` in [0, 1] of one case.

  The score is the target class's logit summed over a region (by default
  the pixels predicted as that class, all pixels if none are); with A_c the
  layer's channel-c feature map and alpha_c the spatial mean of
  d score / d A_c, the map is ReLU(sum_c alpha_c A_c), resized (linearly)
  to the input size and min-max scaled to [0, 1] (all zeros if constant).

  Args:
    model: a Flax module; `apply(variables, x, train=False)` gives logits.
    variables: its variables.
    image: `[*spatial, C]`, one normalised case, spatial sizes divisible by
      `inference.input_divisor(model)`.
    layer: a name from `feature_layer_names`, e.g. 'enc_2' or 'dec_0'.
    target_class: logit channel; 0 for K == 1, 1 (first foreground class)
      for K >= 2 by default.
    mask: optional `[*spatial]` region whose logits are summed.
    threshold: foreground threshold for K == 1 (default region).

  Returns:
    float32 NumPy heat map `[*spatial]`.
  """
  x = _batched_input(image)
  if mask is not None and np.shape(mask) != x.shape[1:-1]:
    raise ValueError(f'Grad-CAM: mask shape {np.shape(mask)} must be the '
                     f'image\'s spatial shape {x.shape[1:-1]}.')
  shape = _layer_shape(model, variables, x, layer)

  def score(delta, variables, x):
    captured = {}
    with nn.intercept_methods(_intercepting(layer, delta, captured)):
      logits = model.apply(variables, x, train=False)
    k = logits.shape[-1]
    target = (0 if k == 1 else 1) if target_class is None else target_class
    if not 0 <= target < k:
      raise ValueError(f'Grad-CAM: target_class={target} but the model has '
                       f'{k} output channel(s).')
    region = (jnp.asarray(mask, jnp.float32)[None] if mask is not None else
              _target_mask(jax.lax.stop_gradient(logits), target, threshold))
    return (logits[..., target] * region).sum(), captured['value']

  zeros = jnp.zeros(shape.shape, shape.dtype)
  grads, features = jax.jit(jax.grad(score, has_aux=True))(zeros, variables,
                                                          x)
  spatial_axes = tuple(range(1, x.ndim - 1))
  alpha = grads.astype(jnp.float32).mean(axis=spatial_axes, keepdims=True)
  cam = jax.nn.relu((alpha * features.astype(jnp.float32)).sum(axis=-1))[0]
  cam = jax.image.resize(cam, x.shape[1:-1], method='linear')
  cam = np.asarray(cam, np.float32)
  low, high = cam.min(), cam.max()
  if high - low <= 1e-12 * max(abs(high), 1.0):
    return np.zeros_like(cam)
  return (cam - low) / (high - low)


def overlay(image, heatmap, alpha: float = 0.4, cmap: str = 'jet'
            ) -> np.ndarray:
  """Returns an RGB uint8 `[H, W, 3]` of a heat map blended over an image.

  Args:
    image: `[H, W]` or `[H, W, C]` (C = 1 or 3: shown as is; otherwise the
      first channel in grey), any range (min-max scaled for display).
    heatmap: `[H, W]` in [0, 1], e.g. `grad_cam(...)` (a slice of it in 3D).
    alpha: weight of the heat map's colours (0 = image only).
    cmap: a matplotlib colormap name.
  """
  image = np.asarray(image, np.float32)
  heatmap = np.asarray(heatmap, np.float32)
  if image.ndim == 3 and image.shape[-1] != 3:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] != heatmap.shape or heatmap.ndim != 2:
    raise ValueError(f'overlay: image {image.shape[:2]} and heat map '
                     f'{heatmap.shape} must be 2D of the same size (take a '
                     'slice of a volume first).')
  low, high = image.min(), image.max()
  image = (image - low) / (high - low) if high > low else np.zeros_like(image)
  colours = matplotlib.colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]
  rgb = (1.0 - alpha) * image + alpha * colours
  return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
