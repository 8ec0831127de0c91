"""train_and_evaluate(config, workdir): the training loop, in labelled sections.

Checks (config values, workdir lock, recipe, data set, mesh) -> input ->
model and optimiser -> state (every checkpoint checked against it; fresh, or
resumed from the newest intact one) -> jitted steps -> loop (update, log,
evaluate (and the EMA parameters), reduce-on-plateau, early stopping,
checkpoint) -> summary. The checks all run at start-up: the train
step itself is untouched.
"""

import contextlib
import functools
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from medseg_jax import case_validation
from medseg_jax import checkpoint as checkpoint_lib
from medseg_jax import config_checks
from medseg_jax import config_lib
from medseg_jax import device_augment
from medseg_jax import metrics
from medseg_jax import models
from medseg_jax import optim
from medseg_jax import parallel
from medseg_jax import register_cases
from medseg_jax import state as state_lib
from medseg_jax import steps
from medseg_jax import tensorboard as tensorboard_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import check
from medseg_jax.data import pipeline


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss becomes NaN or infinite."""


def training_schedule(config, num_train: int) -> dict[str, int]:
  """Converts durations in epochs to steps, in one place.

  An epoch is `config.train.steps_per_epoch` steps when that is > 0
  (nnU-Net's fixed 250 iterations), else one pass over the training cases
  (num_train // batch_size steps). The data stream does not depend on it:
  examples are drawn from successive shuffled passes over the cases.

  Returns:
    {'steps_per_epoch', 'total_steps', 'warmup_steps', 'eval_every',
    'checkpoint_every', 'log_every'}.
  """
  batch = config.train.batch_size
  if num_train < batch:
    raise ValueError(f'The train split has {num_train} cases, fewer than '
                     f'config.train.batch_size={batch}.')
  fixed = config.train.steps_per_epoch
  per_epoch = fixed if fixed > 0 else num_train // batch
  total = (config.train.num_steps if config.train.num_steps > 0 else
           max(1, round(config.train.num_epochs * per_epoch)))
  eval_every = max(1, round(config.train.eval_every_epochs * per_epoch))
  ckpt_every = config.train.checkpoint_every_steps
  return {
      'steps_per_epoch': per_epoch,
      'total_steps': total,
      'warmup_steps': round(config.optim.warmup_epochs * per_epoch),
      'eval_every': eval_every,
      'checkpoint_every': ckpt_every if ckpt_every > 0 else eval_every,
      'log_every': max(1, config.train.log_every_steps),
  }


def _host(tree):
  """Fetches replicated global arrays to host NumPy (works multi-process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _check_finite(pending, latest_checkpoint) -> None:
  """Raises NonFiniteLossError naming the first step with a non-finite loss.

  The parameter norm is checked too: an update can turn the parameters to NaN
  while the loss of that step (computed before the update) is still finite.
  """
  for step, values in pending:
    bad = {k: values[k] for k in ('loss', 'l2_params')
           if not np.isfinite(values[k])}
    if bad:
      raise NonFiniteLossError(
          f'Non-finite {bad} at step {step}; stopping. The latest '
          f'checkpoint (step {latest_checkpoint}) predates it and was kept. '
          'Try a lower config.optim.lr or config.model.dtype=float32.')


class _IntervalLogger:
  """Collects per-step metrics on device; fetches, checks and logs them in batches.

  Fetching only every `log_every` steps keeps the host from waiting on the
  device each step.
  """

  def __init__(self, log, bar, batch_size: int, steps_per_epoch: int):
    self._log, self._bar = log, bar
    self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
    self._pending = []
    self.restart_clock()

  def restart_clock(self) -> None:
    """Starts timing a new interval of training steps."""
    self._start, self._steps = time.perf_counter(), 0

  def add(self, step: int, step_metrics) -> None:
    """Records one step's (device) metrics."""
    self._pending.append((step, step_metrics))
    self._steps += 1
    self._bar.update(1)

  def flush(self, step: int, last_checkpoint) -> None:
    """Fetches pending metrics, stops on non-finite values, logs their mean."""
    if not self._pending:
      return
    fetched = [(s, _host(m)) for s, m in self._pending]
    _check_finite(fetched, last_checkpoint)
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    summary = {k: float(np.mean([m[k] for _, m in fetched]))
               for k in fetched[-1][1]}
    summary['images_per_s'] = self._steps * self._batch_size / elapsed
    summary['epoch'] = step / self._steps_per_epoch
    self._log.write(step, 'train', summary)
    self._bar.set_postfix(loss=f'{summary["loss"]:.4f}',
                          img_s=f'{summary["images_per_s"]:.1f}')
    self._pending = []
    self.restart_clock()


def evaluate(eval_step, state, data, config, split: str, mesh) -> dict:
  """Runs `eval_step` over a whole split and returns summarised metrics."""
  dataset = pipeline.eval_dataset(
      data, config.data, split, global_batch=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  totals, iterator = None, iter(dataset)
  try:
    for local in iterator:
      sums = eval_step(state, parallel.global_batch(local, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  finally:
    iterator.close()  # Stops worker processes and frees their shared memory.
  return metrics.summarize_sums(_host(totals))


@contextlib.contextmanager
def _writer_lock(workdir: str):
  """Holds the workdir's lock (process 0) while the run writes into it.

  Every process learns whether process 0 got it, so none of them waits
  forever for a process 0 that was refused.
  """
  with contextlib.ExitStack() as stack:
    refusal = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.acquire_lock(workdir, 'training'))
      except workdir_lib.WorkdirInUseError as e:
        refusal = e
    if not parallel.process_zero_says(refusal is None):
      raise refusal or workdir_lib.WorkdirInUseError(
          f'{workdir} is in use (process 0 could not lock it).')
    yield


class _EarlyStopping:
  """Counts evaluations without a better validation Dice (patience 0: off).

  The count at a resume is derived from the checkpoints alone (the step of
  the best one and the evaluation interval), so every process, and a run
  started again, agrees with the run that was interrupted.
  """

  def __init__(self, patience: int, eval_every: int, start_step: int,
               best_step):
    self.patience, self.best_step = patience, best_step
    if best_step is None or best_step <= start_step:
      self.count = start_step // eval_every - (best_step or 0) // eval_every
    else:  # A best of a later step exists: its step is trained again.
      self.count = 0

  def stopped(self) -> bool:
    """Whether the patience has run out."""
    return self.patience > 0 and self.count >= self.patience

  def update(self, step: int, improved: bool) -> bool:
    """Records the evaluation at `step`; returns whether to stop now.

    Reaching a best checkpoint's step again (a resume from before it) counts
    as the improvement it was, though its Dice only equals the best.
    """
    if improved or step == self.best_step:
      self.count, self.best_step = 0, step
    else:
      self.count += 1
    return self.stopped()


def _evaluate_ema(eval_step, state, data, config, mesh, log, ckpt, step,
                  best_ema_dice: float) -> float:
  """Evaluates the EMA parameters, logs 'val_ema', saves a better best_ema.

  Returns:
    The best EMA validation Dice so far.
  """
  ema_state = state.replace(params=optim.ema_params(state.opt_state))
  metrics = evaluate(eval_step, ema_state, data, config, 'val', mesh)
  log.write(step, 'val_ema', metrics)
  if metrics['dice'] > best_ema_dice:
    ckpt.check_space()
    if ckpt.save_best(step, ema_state, metrics, kind='best_ema'):
      return metrics['dice']
  return best_ema_dice


def train_and_evaluate(config, workdir: str, explicit=None) -> dict:
  """Trains, evaluates on the validation split and checkpoints, resuming if possible.

  Before anything is written, the config's values are validated, the workdir
  is locked (one writer), and a resume is checked against the run's
  config.json (one recipe) and its checkpoints (same model).

  Args:
    config: the experiment's ConfigDict (see configs/default.py).
    workdir: where config.json, metrics.jsonl and checkpoints/ are written.
    explicit: the keys given on the command line when they alone bind
      (see `config_lib.fill_from_data`); None for a config from code.

  Returns:
    The validation metrics of the last evaluation, plus 'best_dice' (the
    whole-case Dice with train.case_val_every > 0; and 'best_ema_dice' with
    train.ema_decay > 0, 'early_stop_step' when the run stopped early).
  """
  # Values the data set states itself (dataset.json's channels and labels)
  # fill the defaults; contradictions are refused before anything is written.
  config = config_lib.fill_from_data(config, explicit=explicit)
  config_checks.validate_config(config)
  workdir_lib.check_writable(workdir)
  with _writer_lock(workdir):
    return _train_locked(config, workdir)


def _train_locked(config, workdir: str) -> dict:
  """train_and_evaluate, once the config is valid and the workdir is ours."""
  is_main = jax.process_index() == 0

  # Recipe, data set and mesh: every problem with them (the data set's files
  # too, all listed at once) is reported before anything is written.
  workdir_lib.check_recipe(workdir, config)
  if config.data.check:
    check.assert_dataset_ok(config.data)
  data = pipeline.build_splits(config.data)
  register_cases.attach(data.source, config.data, workdir if is_main else '')
  sched = training_schedule(config, data.size('train'))
  total_steps = sched['total_steps']
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh,
                            'config.train.batch_size')
  parallel.check_batch_size(config.eval.batch_size, mesh,
                            'config.eval.batch_size')
  accum = config.train.grad_accum_steps
  if accum > 1:
    parallel.check_batch_size(
        config.train.batch_size // accum, mesh,
        'config.train.batch_size / config.train.grad_accum_steps')
  ema_decay = config.train.ema_decay
  plateau_on = config.optim.plateau_patience > 0

  # Input. Grain's worker processes read Grain's absl flags, which main's
  # app.run parses; callers outside app.run (notebooks, tests) have none.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  train_iter = iter(pipeline.train_dataset(
      data, config.data, global_batch=config.train.batch_size,
      num_steps=total_steps, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()))

  # Model and optimiser.
  model = models.create_model(config.model, config.data.num_classes)
  case_val = (case_validation.CaseValidator(
      config, model, data, sched['eval_every'], total_steps)
              if config.train.case_val_every > 0 else None)
  schedule = optim.learning_rate_schedule(
      config.optim, total_steps=total_steps, warmup_steps=sched['warmup_steps'])
  tx = optim.create_optimizer(config.optim, schedule, ema_decay)

  # State: every saved checkpoint (latest and best) must hold this model;
  # then the newest intact latest one is restored, or the state is fresh.
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  input_shape = (1, *config_lib.spatial_shape(config), config.data.in_channels)
  abstract = state_lib.abstract_train_state(model, tx, input_shape, init_rng)
  shardings = state_lib.state_shardings(abstract, mesh)
  damaged = checkpoint_lib.check_all_match(workdir, abstract)
  if is_main:
    workdir_lib.write_config(workdir, config)
  parallel.barrier('config_written')
  ckpt = checkpoint_lib.Checkpointer(workdir, config.train.max_checkpoints,
                                     state_bytes=state_lib.nbytes(abstract),
                                     ema=ema_decay > 0)
  state, start_step = ckpt.restore_latest(
      checkpoint_lib.abstract_with_shardings(abstract, shardings), train_iter,
      is_main=is_main, known_damaged=damaged)
  if start_step is not None:
    if is_main:
      print(f'Resuming from step {start_step} of {workdir}.')
  else:
    state = state_lib.create_train_state(model, tx, input_shape, init_rng, mesh)
    start_step = 0
  tb = tensorboard_lib.TensorBoardWriter(
      workdir, start_step,
      enabled=is_main and config.train.tensorboard)
  log = workdir_lib.MetricsLog(workdir, enabled=is_main, tensorboard=tb)
  log.start(start_step)
  best_dice = ckpt.best_metric(is_main=is_main)
  best_ema_dice = (ckpt.best_metric(is_main=is_main, kind='best_ema')
                   if ema_decay > 0 else None)
  early = _EarlyStopping(config.train.early_stopping_patience,
                         sched['eval_every'], start_step, ckpt.best_step())

  # Steps, jitted once; the state is donated so it is updated in place.
  replicated = parallel.replicated_sharding(mesh)
  train_step = jax.jit(
      steps.make_train_step(model, tx, config.loss.weights, schedule,
                            grad_accum_steps=accum,
                            augment=device_augment.for_config(config)),
      donate_argnums=0, out_shardings=(shardings, replicated))
  # Reduce-on-plateau sees each evaluation's Dice once, outside the step.
  observe_plateau = jax.jit(
      lambda st, dice: st.replace(opt_state=optim.observe_plateau(
          st.opt_state, dice, config.optim)),
      donate_argnums=0, out_shardings=shardings) if plateau_on else None
  eval_step = jax.jit(
      steps.make_eval_step(model, config.data.num_classes,
                           config.eval.threshold), out_shardings=replicated)
  # Overlays: one process holds all the state (multi-process: scalars only).
  overlays = (tensorboard_lib.OverlaySampler(model, config, data)
              if tb.enabled and jax.process_count() == 1 else None)

  # Loop.
  if is_main:
    print(f'Training {config.model.name} for {total_steps} steps '
          f'({sched["steps_per_epoch"]} per epoch) on {mesh.devices.size} '
          f'{jax.devices()[0].platform.upper()} device(s); '
          f'{data.size("train")}/{data.size("val")}/{data.size("test")} '
          'train/val/test cases.')
  bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                  disable=not (is_main and config.train.progress_bar),
                  dynamic_ncols=True)
  logger = _IntervalLogger(log, bar, config.train.batch_size,
                           sched['steps_per_epoch'])
  last_checkpoint, val_metrics = start_step or None, {}
  stop_step = start_step if early.stopped() else None
  if stop_step is not None and is_main:
    print(f'{workdir} stopped early at step {stop_step} (no better '
          f'validation Dice in {early.patience} evaluations); reporting.')
  failed = True
  try:
    for step in range(start_step + 1, total_steps + 1):
      if stop_step is not None:
        break
      local = next(train_iter)
      batch = parallel.global_batch(  # 'position': on-device augmentation.
          {k: local[k] for k in ('image', 'label', 'position') if k in local},
          mesh)
      if step == start_step + 1:  # Compile once, timed, before the first step.
        compile_start = time.perf_counter()
        train_step = train_step.lower(state, batch, train_rng).compile()
        log.write(step, 'compile', {'compile_time_s':
                                    time.perf_counter() - compile_start})
        logger.restart_clock()
      state, step_metrics = train_step(state, batch, train_rng)
      logger.add(step, step_metrics)

      is_eval = step % sched['eval_every'] == 0 or step == total_steps
      is_ckpt = is_eval or step % sched['checkpoint_every'] == 0
      if step % sched['log_every'] == 0 or is_ckpt:
        # Also before every save: a checkpoint never holds non-finite values.
        logger.flush(step, last_checkpoint)
      if is_eval:
        val_metrics = evaluate(eval_step, state, data, config, 'val', mesh)
        log.write(step, 'val', val_metrics)
        if overlays is not None:
          tb.overlays(step, functools.partial(overlays, state),
                      config.data.num_classes)
        bar.write(f'step {step}: val dice {val_metrics["dice"]:.4f} '
                  f'iou {val_metrics["iou"]:.4f}')
        chosen = val_metrics  # Whole cases choose the best when enabled.
        if case_val is not None:
          chosen = case_val.maybe_run(state, step)
          if chosen is not None:
            log.write(step, case_validation.SPLIT, chosen)
            bar.write(f'step {step}: whole-case val dice '
                      f'{chosen["dice"]:.4f}')
        improved = chosen is not None and bool(chosen['dice'] > best_dice)
        if improved:
          ckpt.check_space()
          if ckpt.save_best(step, state, chosen):
            best_dice = chosen['dice']
        if ema_decay > 0:
          best_ema_dice = _evaluate_ema(eval_step, state, data, config, mesh,
                                        log, ckpt, step, best_ema_dice)
        if observe_plateau is not None:
          state = observe_plateau(state, val_metrics['dice'])
        if early.update(step, improved) and step < total_steps:
          stop_step = step
          log.write(step, 'early_stop', {
              'best_step': -1 if early.best_step is None else early.best_step,
              'best_dice': best_dice, 'patience': early.patience})
          bar.write(f'step {step}: stopping early, no better validation '
                    f'Dice in {early.patience} evaluations.')
      if is_ckpt:
        ckpt.check_space()
        ckpt.save_latest(step, state, train_iter)
        last_checkpoint = step
        logger.restart_clock()  # Evaluation and saving are not training time.
    ckpt.wait()
    failed = False
  except Exception as e:  # pylint: disable=broad-except
    if workdir_lib.is_disk_full(e) and not isinstance(
        e, workdir_lib.DiskFullError):
      raise ckpt.disk_full_error() from e
    raise
  finally:  # Pending saves complete even when the run stops on an error.
    bar.close()
    tb.close()
    train_iter.close()
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      # A save that failed in the background (full disk) surfaces here.
      if not workdir_lib.is_disk_full(e):
        raise
      if not failed:  # Else the error being raised says it already.
        raise ckpt.disk_full_error() from e
  if not val_metrics:  # The run had already finished: report, do not retrain.
    val_metrics = evaluate(eval_step, state, data, config, 'val', mesh)
  val_metrics['best_dice'] = best_dice
  if ema_decay > 0:
    val_metrics['best_ema_dice'] = best_ema_dice
  if stop_step is not None:
    val_metrics['early_stop_step'] = stop_step
  return val_metrics
