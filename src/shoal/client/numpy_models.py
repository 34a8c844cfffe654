"""Reference NumPy models with analytic gradients, local SGD, and a client that runs them.

The models work directly on a flat parameter vector through zero-copy views,
and write their gradient into a flat vector the caller owns, so a training
loop allocates nothing parameter-sized per step. Weights are ``(out, in)``
matrices as in ``torch.nn.Linear``, and activations are computed one column
per example (``weight @ x.T``), which keeps the per-example reductions
contiguous. Every function accepts float32 or float64 vectors; gradient
checks use float64.

>>> model = SoftmaxRegression(num_features=4, num_classes=3)
>>> params = model.init_parameters(np.random.default_rng(0))
>>> x, y = np.ones((5, 4), np.float32), np.zeros(5, np.int64)
>>> loss, gradient = model.loss_and_gradient(params.vector, x, y)
>>> gradient.shape == params.vector.shape
True
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from shoal.client.api import (
    Client,
    DataTransform,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
)
from shoal.client.dp_sgd import (
    DpSgdSettings,
    PerExampleGradientModel,
    dp_sgd_metrics,
    dp_sgd_training,
    poisson_sampling_rate,
)
from shoal.core.errors import ClientError, DataError
from shoal.core.parameters import Layout, Parameters, TensorSpec
from shoal.preprocessing import Scaler

FloatArray = npt.NDArray[np.floating[Any]]
LabelArray = npt.NDArray[np.int64]


class NumpyModel(Protocol):
    """What :func:`local_sgd` and :class:`NumpyClient` need from a model."""

    num_classes: int

    @property
    def layout(self) -> Layout: ...

    def init_parameters(self, rng: np.random.Generator) -> Parameters: ...

    def loss_and_gradient(
        self, vector: FloatArray, x: FloatArray, y: LabelArray, *, out: FloatArray | None = None
    ) -> tuple[float, FloatArray]: ...

    def predict(self, vector: FloatArray, x: FloatArray) -> LabelArray: ...

    def probabilities(self, vector: FloatArray, x: FloatArray) -> FloatArray: ...

    def evaluate(self, vector: FloatArray, x: FloatArray, y: LabelArray) -> tuple[float, float]: ...


def softmax_cross_entropy_(
    logits: FloatArray, labels: LabelArray, *, positions: LabelArray | None = None
) -> float:
    """Mean cross-entropy of ``logits`` (classes, n); overwrites them with its gradient.

    One column per example: the per-example reductions then run along
    contiguous rows, several times faster than along short rows for the
    small batches of simulated clients. Numerically stable (each column's
    maximum is subtracted before ``exp``). ``logits`` must be C-contiguous;
    the trailing underscore says they are modified in place.
    """
    if not logits.flags.c_contiguous:
        raise ValueError("softmax_cross_entropy_ needs C-contiguous logits")
    count = int(logits.shape[1])
    at_label = label_positions(labels) if positions is None else positions
    flat = logits.reshape(-1)
    # the ufuncs' own reductions: the array methods' wrappers cost more than these few
    # values' arithmetic, several times a step
    logits -= np.maximum.reduce(logits, axis=0)
    picked = flat.take(at_label)
    np.exp(logits, out=logits)
    totals = np.add.reduce(logits, axis=0)
    loss = float(np.add.reduce(np.log(totals)) - np.add.reduce(picked)) / count
    logits /= totals
    flat[at_label] -= 1.0
    logits *= 1.0 / count
    return loss


def label_positions(labels: LabelArray) -> LabelArray:
    """Where each example's label sits in its logits (classes, n), flattened: what
    :func:`softmax_cross_entropy_` reads and writes there."""
    count = len(labels)
    positions: LabelArray = labels * count + np.arange(count)
    return positions


def l2_penalty_(
    weights: list[FloatArray], gradients: list[FloatArray], *, weight_decay: float
) -> float:
    """``weight_decay / 2 * sum ||w||^2``; adds ``weight_decay * w`` to each gradient in place."""
    if weight_decay == 0.0:
        return 0.0
    for weight, gradient in zip(weights, gradients, strict=True):
        gradient += weight_decay * weight
    return 0.5 * weight_decay * float(sum(np.vdot(w, w) for w in weights))


def accuracy(logits: FloatArray, labels: LabelArray) -> float:
    """Share of columns of ``logits`` (classes, n) whose largest entry is at the label."""
    return float(np.mean(np.argmax(logits, axis=0) == labels))


def check_labels(labels: LabelArray, *, num_classes: int) -> None:
    """Raise :class:`DataError` unless every label lies in ``[0, num_classes)``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes})")


class _Held(NamedTuple):
    """What :meth:`_FlatModel._training_on` derived from its rows and labels."""

    rows: FloatArray
    columns: FloatArray
    labels: LabelArray
    positions: LabelArray


class _FlatModel:
    """Shared machinery: a layout, views of a flat vector, evaluation and prediction."""

    def __init__(
        self,
        specs: tuple[TensorSpec, ...],
        *,
        num_features: int,
        num_classes: int,
        weight_decay: float,
        decayed: tuple[int, ...],
    ) -> None:
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise DataError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.weight_decay = float(weight_decay)
        self._decayed = decayed  # the tensors weight decay applies to
        self._layout = Layout(specs)
        self._spans = [
            (start, end, spec.shape)
            for spec, (start, end) in zip(specs, self._layout.offsets(), strict=True)
        ]
        self._recent: tuple[tuple[weakref.ref[FloatArray], tuple[FloatArray, ...]], ...] = ()
        self._columns: _Held | None = None  # see _training_on

    def __getstate__(self) -> dict[str, Any]:
        """The model as it pickles (to a simulation's workers): without its recent views."""
        return {**self.__dict__, "_recent": (), "_columns": None}

    @contextlib.contextmanager
    def _training_on(self, x: FloatArray, y: LabelArray) -> Iterator[None]:
        """While inside, ``x`` and ``y`` (which the caller leaves unchanged meanwhile) are
        read through what is derived from them once: ``x`` is multiplied as a contiguous
        transposed copy (a product against ``x.T``, a strided view, takes two to three times
        as long: 13 against 5 µs for 200 rows of 64 features), and each label's place in
        the logits is found once. Each step of a full-batch client's training reads them.
        Other arrays are read as before; a thread that trains the same model on other rows
        meanwhile finds its own rows unheld."""
        self._columns = _Held(x, np.ascontiguousarray(x.T), y, label_positions(y))
        try:
            yield
        finally:
            self._columns = None

    def _transposed(self, x: FloatArray) -> FloatArray:
        """``x.T``: the copy :meth:`_training_on` holds for ``x``, else the view."""
        held = self._columns  # swapped whole, never edited
        if held is not None and held.rows is x:
            return held.columns
        return x.T

    def _positions(self, y: LabelArray) -> LabelArray | None:
        """The label positions :meth:`_training_on` holds for ``y`` (None: none held)."""
        held = self._columns
        return held.positions if held is not None and held.labels is y else None

    @property
    def layout(self) -> Layout:
        return self._layout

    def evaluate(self, vector: FloatArray, x: FloatArray, y: LabelArray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the model on ``(x, y)``, without weight decay."""
        if x.shape[0] == 0:
            raise DataError("cannot evaluate on zero examples")
        check_labels(y, num_classes=self.num_classes)
        logits = self._logits(vector, x)
        share = accuracy(logits, y)
        return softmax_cross_entropy_(logits, y, positions=self._positions(y)), share

    def predict(self, vector: FloatArray, x: FloatArray) -> LabelArray:
        """The most likely class of each row of ``x``."""
        labels: LabelArray = np.argmax(self._logits(vector, x), axis=0).astype(np.int64)
        return labels

    def probabilities(self, vector: FloatArray, x: FloatArray) -> FloatArray:
        """Each row of ``x``'s class probabilities, shape (rows, classes)."""
        logits = self._logits(vector, x).astype(np.float64)
        logits -= logits.max(axis=0, keepdims=True)
        exponentials = np.exp(logits)
        shares: FloatArray = (exponentials / exponentials.sum(axis=0, keepdims=True)).T
        return shares

    def add_weight_decay_(self, vector: FloatArray, gradient: FloatArray) -> float:
        """Add weight decay's gradient to ``gradient`` in place; return its penalty."""
        weights, gradients = self._views(vector), self._views(gradient)
        return l2_penalty_(
            [weights[index] for index in self._decayed],
            [gradients[index] for index in self._decayed],
            weight_decay=self.weight_decay,
        )

    def _views(self, vector: FloatArray) -> tuple[FloatArray, ...]:
        """The tensors' views of ``vector``. Those of the latest two vectors are kept (a
        training step takes the weights' and the gradient's, the same two arrays each step of
        a client's training: making them took a tenth of a small model's training)."""
        recent = self._recent  # swapped whole, never edited: threads may share the model
        for held, views in recent:
            if held() is vector:
                return views
        if vector.shape != (self._layout.size,):
            raise ClientError(f"need a vector of {self._layout.size} values, got {vector.shape}")
        views = tuple(vector[start:end].reshape(shape) for start, end, shape in self._spans)
        self._recent = ((weakref.ref(vector), views), *recent[:1])
        return views

    def _example_views(
        self, count: int, dtype: np.dtype[Any]
    ) -> tuple[FloatArray, list[FloatArray]]:
        """A new (count, P) array, one row per example, and its per-tensor views (count, *shape)."""
        rows = np.empty((count, self._layout.size), dtype=dtype)
        # Splitting a row's contiguous span into a tensor's shape needs no copy: these are views.
        views = [rows[:, start:end].reshape(count, *shape) for start, end, shape in self._spans]
        return rows, views

    def _logits(self, vector: FloatArray, x: FloatArray) -> FloatArray:
        raise NotImplementedError


class SoftmaxRegression(_FlatModel):
    """Multinomial logistic regression: tensors ``weight`` (c, d) and ``bias`` (c,).

    ``weight_decay`` adds ``weight_decay / 2 * ||weight||^2`` to the loss (not the bias).
    """

    def __init__(self, *, num_features: int, num_classes: int, weight_decay: float = 0.0) -> None:
        _check_sizes(num_features=num_features, num_classes=num_classes)
        specs = (
            TensorSpec("weight", (num_classes, num_features)),
            TensorSpec("bias", (num_classes,)),
        )
        super().__init__(
            specs,
            weight_decay=weight_decay,
            num_features=num_features,
            num_classes=num_classes,
            decayed=(0,),
        )

    def init_parameters(self, rng: np.random.Generator) -> Parameters:
        """All zeros (the loss is convex); ``rng`` is accepted for a uniform interface."""
        del rng
        return Parameters.zeros(self.layout)

    def loss_and_gradient(
        self, vector: FloatArray, x: FloatArray, y: LabelArray, *, out: FloatArray | None = None
    ) -> tuple[float, FloatArray]:
        """Mean cross-entropy plus weight decay, and its gradient (written into ``out``)."""
        gradient = np.empty_like(vector) if out is None else out
        grad_weight, grad_bias = self._views(gradient)
        weight, bias = self._views(vector)
        logits = _affine_logits(weight, bias, self._transposed(x))
        loss = softmax_cross_entropy_(logits, y, positions=self._positions(y))
        np.matmul(logits, x, out=grad_weight)
        np.add.reduce(logits, axis=1, out=grad_bias)
        loss += l2_penalty_([weight], [grad_weight], weight_decay=self.weight_decay)
        return loss, gradient

    def per_example_gradients(
        self, vector: FloatArray, x: FloatArray, y: LabelArray
    ) -> tuple[float, FloatArray]:
        """Mean cross-entropy and each example's gradient of its own loss, as rows (n, P).

        Weight decay is left out of both (see :meth:`add_weight_decay_`): the
        rows' mean plus weight decay is :meth:`loss_and_gradient`'s gradient.
        """
        count = x.shape[0]
        logits = self._logits(vector, x)
        loss = softmax_cross_entropy_(logits, y)
        logits *= count  # from the batch mean back to each example's own loss
        rows, (grad_weight, grad_bias) = self._example_views(count, logits.dtype)
        np.multiply(logits.T[:, :, np.newaxis], x[:, np.newaxis, :], out=grad_weight)
        grad_bias[...] = logits.T
        return loss, rows

    def _logits(self, vector: FloatArray, x: FloatArray) -> FloatArray:
        weight, bias = self._views(vector)
        return _affine_logits(weight, bias, self._transposed(x))


def _affine_logits(weight: FloatArray, bias: FloatArray, columns: FloatArray) -> FloatArray:
    """The logits (classes, n) of the examples in the ``columns`` (features, n) under
    ``weight`` and ``bias``."""
    logits = weight @ columns
    logits += bias[:, np.newaxis]
    return logits


class MLP(_FlatModel):
    """One hidden ReLU layer and a softmax output, trained with cross-entropy.

    Tensors: ``hidden.weight`` (h, d), ``hidden.bias`` (h,), ``output.weight``
    (c, h), ``output.bias`` (c,). ``weight_decay`` applies to both weights.
    """

    def __init__(
        self, *, num_features: int, num_hidden: int, num_classes: int, weight_decay: float = 0.0
    ) -> None:
        _check_sizes(num_features=num_features, num_hidden=num_hidden, num_classes=num_classes)
        self.num_hidden = num_hidden
        specs = (
            TensorSpec("hidden.weight", (num_hidden, num_features)),
            TensorSpec("hidden.bias", (num_hidden,)),
            TensorSpec("output.weight", (num_classes, num_hidden)),
            TensorSpec("output.bias", (num_classes,)),
        )
        super().__init__(
            specs,
            weight_decay=weight_decay,
            num_features=num_features,
            num_classes=num_classes,
            decayed=(0, 2),
        )

    def init_parameters(self, rng: np.random.Generator) -> Parameters:
        """Uniform in +-1/sqrt(fan_in) for every tensor, as PyTorch's ``nn.Linear`` does."""
        fan_ins = (self.num_features, self.num_features, self.num_hidden, self.num_hidden)
        arrays = [
            rng.uniform(-1.0, 1.0, spec.shape) / math.sqrt(fan_in)
            for spec, fan_in in zip(self.layout.specs, fan_ins, strict=True)
        ]
        return Parameters.from_arrays(arrays, names=self.layout.names)

    def loss_and_gradient(
        self, vector: FloatArray, x: FloatArray, y: LabelArray, *, out: FloatArray | None = None
    ) -> tuple[float, FloatArray]:
        """Mean cross-entropy plus weight decay, and its gradient (written into ``out``)."""
        hidden_w, _, output_w, _ = self._views(vector)
        gradient = np.empty_like(vector) if out is None else out
        grad_hidden_w, grad_hidden_b, grad_output_w, grad_output_b = self._views(gradient)
        hidden = self._hidden(vector, x)
        logits = self._output(vector, hidden)
        loss = softmax_cross_entropy_(logits, y, positions=self._positions(y))
        np.matmul(logits, hidden.T, out=grad_output_w)
        np.add.reduce(logits, axis=1, out=grad_output_b)
        grad_hidden = output_w.T @ logits
        # ReLU passes the gradient where the activation is positive, nowhere else.
        np.multiply(grad_hidden, hidden > 0, out=grad_hidden)
        np.matmul(grad_hidden, x, out=grad_hidden_w)
        np.add.reduce(grad_hidden, axis=1, out=grad_hidden_b)
        loss += l2_penalty_(
            [hidden_w, output_w], [grad_hidden_w, grad_output_w], weight_decay=self.weight_decay
        )
        return loss, gradient

    def per_example_gradients(
        self, vector: FloatArray, x: FloatArray, y: LabelArray
    ) -> tuple[float, FloatArray]:
        """Mean cross-entropy and each example's gradient of its own loss, as rows (n, P).

        Weight decay is left out of both, as in :meth:`SoftmaxRegression.per_example_gradients`.
        """
        count = x.shape[0]
        output_w = self._views(vector)[2]
        hidden = self._hidden(vector, x)
        logits = self._output(vector, hidden)
        loss = softmax_cross_entropy_(logits, y)
        logits *= count  # from the batch mean back to each example's own loss
        rows, views = self._example_views(count, logits.dtype)
        grad_hidden_w, grad_hidden_b, grad_output_w, grad_output_b = views
        np.multiply(logits.T[:, :, np.newaxis], hidden.T[:, np.newaxis, :], out=grad_output_w)
        grad_output_b[...] = logits.T
        grad_hidden = output_w.T @ logits
        np.multiply(grad_hidden, hidden > 0, out=grad_hidden)
        np.multiply(grad_hidden.T[:, :, np.newaxis], x[:, np.newaxis, :], out=grad_hidden_w)
        grad_hidden_b[...] = grad_hidden.T
        return loss, rows

    def _hidden(self, vector: FloatArray, x: FloatArray) -> FloatArray:
        """ReLU activations, one column per example: (h, n)."""
        hidden_w, hidden_b, _, _ = self._views(vector)
        hidden = hidden_w @ self._transposed(x)
        hidden += hidden_b[:, np.newaxis]
        return np.maximum(hidden, 0.0, out=hidden)

    def _output(self, vector: FloatArray, hidden: FloatArray) -> FloatArray:
        _, _, output_w, output_b = self._views(vector)
        logits = output_w @ hidden
        logits += output_b[:, np.newaxis]
        return logits

    def _logits(self, vector: FloatArray, x: FloatArray) -> FloatArray:
        return self._output(vector, self._hidden(vector, x))


class LocalTrainingResult(NamedTuple):
    """What :func:`local_sgd` returns."""

    parameters: Parameters
    train_loss: float
    num_steps: int


def count_steps(*, num_examples: int, epochs: float, batch_size: int) -> int:
    """``round(epochs * steps_per_epoch)``, at least 1; ``batch_size`` 0 means full batch."""
    batch = num_examples if batch_size == 0 else min(batch_size, num_examples)
    steps_per_epoch = math.ceil(num_examples / batch)
    return max(1, round(epochs * steps_per_epoch))


def local_sgd(
    model: NumpyModel,
    parameters: Parameters,
    x: FloatArray,
    y: LabelArray,
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    rng: np.random.Generator | int,
    dp_sgd: DpSgdSettings | None = None,
) -> LocalTrainingResult:
    """Mini-batch SGD from ``parameters``, reshuffling at each epoch.

    With ``proximal_mu > 0`` the FedProx term ``mu / 2 * ||w - w_start||^2``
    is added to the objective (``mu * (w - w_start)`` to each gradient).
    Fractional ``epochs`` run that share of the steps (see
    :func:`count_steps`). ``train_loss`` is the mean of the model's loss
    (without the proximal term) over the steps, each measured before its
    update. Raises :class:`ClientError` on empty data or a non-finite loss.

    With ``dp_sgd`` the steps are record-level DP-SGD instead (see
    :mod:`shoal.client.dp_sgd`): Poisson batches at ``q = batch / n``,
    per-example clipping, noise, and the expected batch size as
    denominator; the model must be a
    :class:`~shoal.client.dp_sgd.PerExampleGradientModel`. In
    secure mode ``rng`` is not used: the sampling and the noise come from a
    CSPRNG. ``rng`` may be the seed of a generator instead, made only where the steps
    draw (mini-batches, DP-SGD): full-batch steps draw nothing, and making a generator
    costs more than such a client's step.
    """
    _check_training_inputs(x, y, epochs=epochs, batch_size=batch_size, rate=learning_rate)
    check_labels(y, num_classes=model.num_classes)
    num_examples = x.shape[0]
    num_steps = count_steps(num_examples=num_examples, epochs=epochs, batch_size=batch_size)
    if dp_sgd is not None:
        if not isinstance(model, PerExampleGradientModel):
            raise ClientError(
                f"DP-SGD needs per-example gradients, {type(model).__name__} lacks them"
            )
        weights, mean_loss = dp_sgd_training(
            model,
            parameters.vector,
            x,
            y,
            num_steps=num_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            proximal_mu=proximal_mu,
            settings=dp_sgd,
            rng=np.random.default_rng(rng),  # a generator is returned as it is
        )
        return LocalTrainingResult(parameters.with_vector(weights), mean_loss, num_steps)
    batch = num_examples if batch_size == 0 else min(batch_size, num_examples)
    anchor = parameters.vector
    weights = anchor.copy()
    gradient = np.empty_like(weights)
    scratch = np.empty_like(weights) if proximal_mu > 0 else None
    total_loss = 0.0
    held: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if isinstance(model, _FlatModel) and batch >= num_examples and num_steps > 1:
        held = model._training_on(x, y)  # every step reads the same rows
    # A diverging run overflows to inf and NaN; it is reported below, not warned about.
    with held, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for batch_x, batch_y in _batches(x, y, batch=batch, num_steps=num_steps, rng=rng):
            loss, _ = model.loss_and_gradient(weights, batch_x, batch_y, out=gradient)
            total_loss += loss
            if scratch is not None:
                np.subtract(weights, anchor, out=scratch)
                scratch *= proximal_mu
                gradient += scratch
            gradient *= learning_rate
            weights -= gradient
    mean_loss = total_loss / num_steps
    if not math.isfinite(mean_loss):
        raise ClientError(
            f"local training diverged (mean loss {mean_loss}): lower the learning rate"
        )
    return LocalTrainingResult(parameters.with_vector(weights), mean_loss, num_steps)


def _batches(
    x: FloatArray, y: LabelArray, *, batch: int, num_steps: int, rng: np.random.Generator | int
) -> Iterator[tuple[FloatArray, LabelArray]]:
    """``num_steps`` batches; a new permutation each epoch, the last batch may be short."""
    num_examples = x.shape[0]
    if batch >= num_examples:
        for _ in range(num_steps):
            yield x, y
        return
    generator = np.random.default_rng(rng)
    step = 0
    while True:
        order = generator.permutation(num_examples)
        for start in range(0, num_examples, batch):
            chosen = order[start : start + batch]
            yield x[chosen], y[chosen]
            step += 1
            if step == num_steps:
                return


def _check_training_inputs(
    x: FloatArray, y: LabelArray, *, epochs: float, batch_size: int, rate: float
) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ClientError(f"need x of shape (n, d) and y of shape (n,), got {x.shape}, {y.shape}")
    if x.shape[0] == 0:
        raise ClientError("cannot train on zero examples")
    if not (epochs > 0 and rate > 0 and batch_size >= 0 and math.isfinite(epochs * rate)):
        raise ClientError(
            f"need epochs > 0, learning_rate > 0, batch_size >= 0 (0: full batch), "
            f"got {epochs}, {rate}, {batch_size}"
        )


class NumpyClient(Client):
    """A client that trains a :class:`NumpyModel` on local arrays with :func:`local_sgd`.

    ``fit`` is deterministic in ``config.seed`` (except under secure DP-SGD).
    ``eval_data`` None means the client holds no held-out data: ``evaluate``
    then reports zero examples. ``dp_sgd`` turns on record-level DP-SGD for
    every fit; the fit's metrics then carry :func:`dp_sgd_metrics` for the
    coordinator's accountant.
    """

    def __init__(
        self,
        model: NumpyModel,
        *,
        train_data: tuple[npt.ArrayLike, npt.ArrayLike],
        eval_data: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
        parameters: Parameters | None = None,
        init_seed: int = 0,
        dp_sgd: DpSgdSettings | None = None,
    ) -> None:
        self.model = model
        self.dp_sgd = dp_sgd
        self.train_x, self.train_y = _as_examples(train_data)
        self.eval_data = _as_examples(eval_data) if eval_data is not None else None
        if parameters is None:
            parameters = model.init_parameters(np.random.default_rng(init_seed))
        self._parameters = parameters
        self._scaled_by: tuple[Scaler, FloatArray, FloatArray | None] | None = None

    def get_parameters(self) -> Parameters:
        return self._parameters

    def with_training_data(self, transform: DataTransform) -> NumpyClient:
        """This client training on ``transform(features, labels)`` (its evaluation data kept)."""
        features, labels = transform(self.train_x.copy(), self.train_y.copy())
        return NumpyClient(
            self.model,
            train_data=(features, labels),
            eval_data=self.eval_data,
            parameters=self._parameters,
            dp_sgd=self.dp_sgd,
        )

    def local_features(self) -> FloatArray:
        """The training records' features as given, before any scaler (a statistics run
        counts them: :mod:`shoal.client.statistics`)."""
        return self.train_x

    def _scaled(self, scaler: Scaler | None) -> tuple[FloatArray, FloatArray | None]:
        """The training and evaluation features standardized by the task's ``scaler``
        (``[preprocessing]``), computed once a scaler; as given without one."""
        eval_x = None if self.eval_data is None else self.eval_data[0]
        if scaler is None:
            return self.train_x, eval_x
        if self._scaled_by is not None and self._scaled_by[0] is scaler:
            return self._scaled_by[1], self._scaled_by[2]
        if scaler.features != self.train_x.shape[1]:
            raise ClientError(
                f"the run's scaler standardizes {scaler.features} features, this client's "
                f"records have {self.train_x.shape[1]}"
            )
        scaled = (
            scaler.transform(self.train_x),
            None if eval_x is None else scaler.transform(eval_x),
        )
        self._scaled_by = (scaler, *scaled)
        return scaled

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        self._check_layout(parameters)
        train_x, _ = self._scaled(config.scaler)
        result = local_sgd(
            self.model,
            parameters,
            train_x,
            self.train_y,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            proximal_mu=config.proximal_mu,
            rng=config.seed,
            dp_sgd=self.dp_sgd,
        )
        self._parameters = result.parameters
        metrics = {"loss": result.train_loss, "steps": float(result.num_steps)}
        if self.dp_sgd is not None:
            rate = poisson_sampling_rate(
                num_examples=len(self.train_y), batch_size=config.batch_size
            )
            metrics |= dp_sgd_metrics(self.dp_sgd, steps=result.num_steps, sampling_rate=rate)
        return FitResult(result.parameters, num_examples=len(self.train_y), metrics=metrics)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        self._check_layout(parameters)
        if self.eval_data is None or len(self.eval_data[1]) == 0:
            return EvaluateResult(loss=0.0, num_examples=0, metrics={})
        _, eval_x = self._scaled(config.scaler)
        eval_y = self.eval_data[1]
        assert eval_x is not None
        loss, share = self.model.evaluate(parameters.vector, eval_x, eval_y)
        return EvaluateResult(loss=loss, num_examples=len(eval_y), metrics={"accuracy": share})

    def _check_layout(self, parameters: Parameters) -> None:
        if parameters.layout.size != self.model.layout.size:
            raise ClientError(
                f"received {parameters.layout.size} values, the model has {self.model.layout.size}"
            )


def _as_examples(data: tuple[npt.ArrayLike, npt.ArrayLike]) -> tuple[FloatArray, LabelArray]:
    """Contiguous float32 features and int64 labels, checked for matching lengths."""
    x = np.ascontiguousarray(data[0], dtype=np.float32)
    y = np.ascontiguousarray(data[1], dtype=np.int64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"need features (n, d) and labels (n,), got {x.shape} and {y.shape}")
    return x, y


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
