"""Training an adapter: a metric-learning head (optionally the backbone's last blocks) on labelled features.

The head: Dense(512, ReLU) → Dense(``dim``) → unit length. Losses:

* ``"arcface"`` (default) – a cosine classifier with an additive angular margin
  (Deng et al., 2019): each class gets a direction; a photo must be closer to
  its class's direction than to any other by a margin. Stable on small data.
* ``"supcon"`` – supervised contrastive (Khosla et al., 2020): in each batch,
  photos of one class are pulled together and the rest pushed apart.

:func:`fit_adapter` trains on plain arrays and blends the head with the plain
features; :mod:`.pipeline` feeds it a library's photos.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_path, file_sha256, write_json
from ..errors import UsageError, check_choice
from ..metrics import retrieval_against, retrieval_among
from .model import AdapterError, embed

LOSSES = ("arcface", "supcon")
VALIDATION_SHARE = 0.2  # of the labelled photos, held out to stop training and to report scores


def stratified_split(labels: np.ndarray, share: float, *, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, test)``: ``share`` of each class (at least one photo) in test, the rest in train."""
    rng = np.random.default_rng(random_state)
    train, test = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = min(len(rows) - 1, max(1, int(round(share * len(rows))))) if len(rows) > 1 else 0
        test.extend(rows[:cut])
        train.extend(rows[cut:])
    return np.sort(np.array(train, int)), np.sort(np.array(test, int))


def class_split(labels: np.ndarray, share: float = 0.5, *, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, test)`` by class: ``share`` of the classes are only in test (never seen in training)."""
    classes = np.random.default_rng(random_state).permutation(np.unique(labels))
    unseen = set(classes[:max(1, int(round(share * len(classes))))])
    test = np.array([label in unseen for label in labels])
    return np.flatnonzero(~test), np.flatnonzero(test)


def _balanced_batches(labels: np.ndarray, classes_per_batch: int, per_class: int, rng: np.random.Generator):
    """One epoch of batch row indices: ``classes_per_batch`` classes x ``per_class`` photos each."""
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    steps = max(1, len(labels) // (classes_per_batch * per_class))
    for _ in range(steps):
        chosen = rng.choice(list(by_class), min(classes_per_batch, len(by_class)), replace=False)
        yield np.concatenate([rng.choice(by_class[c], per_class, replace=len(by_class[c]) < per_class)
                              for c in chosen])


def _head(input_dim: int, dim: int, hidden: int, dropout: float):
    import keras

    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.Dropout(dropout)(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    x = keras.layers.Dense(dim, name="projection")(x)
    outputs = keras.layers.UnitNormalization(name="unit")(x)
    return keras.Model(inputs, outputs, name="similar_finder_adapter")


def _arcface_logits(embeddings, labels_onehot, centres, scale: float, margin: float):
    from keras import ops

    cosine = ops.matmul(embeddings, ops.transpose(ops.normalize(centres, axis=1)))
    cosine = ops.clip(cosine, -1.0 + 1e-6, 1.0 - 1e-6)
    with_margin = ops.cos(ops.arccos(cosine) + margin)
    return scale * (labels_onehot * with_margin + (1.0 - labels_onehot) * cosine)


def _supcon_loss(embeddings, labels, temperature: float):
    from keras import ops

    similarity = ops.matmul(embeddings, ops.transpose(embeddings)) / temperature
    n = ops.shape(similarity)[0]
    not_self = 1.0 - ops.eye(n)
    positives = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32") * not_self
    similarity = similarity - 1e9 * (1.0 - not_self)  # a photo is not its own candidate
    log_prob = similarity - ops.logsumexp(similarity, axis=1, keepdims=True)
    per_anchor = ops.sum(positives * log_prob, axis=1) / ops.maximum(ops.sum(positives, axis=1), 1.0)
    return -ops.mean(per_anchor)


def train_head(features: np.ndarray, labels: np.ndarray, *, validation: tuple[np.ndarray, np.ndarray] | None = None,
               dim: int = 128, hidden: int = 512, dropout: float = 0.2, random_state: int = 0, **training):
    """Train a head on frozen ``features`` (N x D); returns ``(head, epochs run)``.

    Inputs are standardised with the training photos' statistics, kept inside
    the returned model, which takes raw features. ``training``: see :func:`train_embedding`.
    """
    import keras

    features = np.asarray(features, np.float32)
    keras.utils.set_random_seed(random_state)
    mean, std = features.mean(0), features.std(0) + 1e-6
    head = _head(features.shape[1], dim, hidden, dropout)
    validation = None if validation is None else ((validation[0] - mean) / std, validation[1])
    run = train_embedding(head, (features - mean) / std, labels, validation=validation, dim=dim,
                          random_state=random_state, **training)
    return _with_standardisation(head, mean, std), run


def train_embedding(body, inputs: np.ndarray, labels, *, validation=None, flipped: np.ndarray | None = None,
                    loss: str = "arcface", dim: int = 128, epochs: int = 60, patience: int = 15,
                    learning_rate: float = 1e-3, per_class: int = 8, classes_per_batch: int = 16,
                    random_state: int = 0) -> int:
    """Train ``body`` (inputs -> unit vectors of ``dim``) with a metric-learning loss; returns the epochs run.

    Batches are class-balanced: ``classes_per_batch`` classes x ``per_class``
    photos. ``flipped`` (the inputs of the mirrored photos) is drawn instead of
    ``inputs`` half of the time, as augmentation. ``validation`` (inputs,
    labels) of other photos decides when to stop: the weights of the epoch with
    the best precision@5 of those photos searched among the training photos are kept.
    """
    import keras
    from keras import ops

    check_choice("loss", loss, LOSSES)
    classes, encoded = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise UsageError("adapting needs at least two classes (one subfolder per class)")
    trainable = list(body.trainable_variables)
    centres = None
    if loss == "arcface":
        centres = keras.Variable(keras.random.normal((len(classes), dim), seed=random_state), name="centres")
        trainable.append(centres)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(trainable)
    rng = np.random.default_rng(random_state)

    def batch_loss(rows):
        batch = inputs[rows]
        if flipped is not None:
            mirrored = rng.random(len(rows)) < 0.5
            batch = np.where(mirrored.reshape(-1, *[1] * (batch.ndim - 1)), flipped[rows], batch)
        embeddings = body(batch, training=True)
        if loss == "arcface":
            onehot = ops.one_hot(encoded[rows], len(classes))
            logits = _arcface_logits(embeddings, onehot, centres, scale=30.0, margin=0.3)
            return ops.mean(keras.losses.categorical_crossentropy(onehot, logits, from_logits=True))
        return _supcon_loss(embeddings, ops.convert_to_tensor(encoded[rows]), temperature=0.1)

    step = _train_step(batch_loss, trainable, optimizer)
    best, best_weights, waited, run = -1.0, None, 0, 0
    for run in range(1, epochs + 1):
        for rows in _balanced_batches(encoded, classes_per_batch, per_class, rng):
            step(rows)
        if validation is None:
            continue
        score = retrieval_against(embed(body, validation[0]), validation[1], embed(body, inputs), labels,
                                  center=False)["precision@5"]
        if score > best + 1e-4:
            best, best_weights, waited = score, body.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_weights is not None:  # without a validation score, the last epoch's weights stay
        body.set_weights(best_weights)
    return run


def _train_step(batch_loss, variables, optimizer):
    """One optimisation step, written once for whichever backend Keras runs on."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def step(rows):
            with tf.GradientTape() as tape:
                value = batch_loss(rows)
            optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
            return value
        return step
    if backend == "torch":
        def step(rows):
            for variable in variables:
                variable.value.grad = None
            value = batch_loss(rows)
            value.backward()
            optimizer.apply([v.value.grad for v in variables], variables)
            return value
        return step
    if backend == "jax":
        import jax

        def step(rows):
            values = [v.value for v in variables]

            def pure(vals):
                for variable, value in zip(variables, vals):
                    variable.assign(value)
                return batch_loss(rows)
            value, grads = jax.value_and_grad(pure)(values)
            for variable, value_ in zip(variables, values):
                variable.assign(value_)
            optimizer.apply(grads, variables)
            return value
        return step
    raise AdapterError(f"training the adapter is not supported on the {backend} backend")


def _with_standardisation(head, mean, std):
    """The head with the input standardisation in front, so the saved model takes raw features."""
    import keras

    inputs = keras.Input((len(mean),), name="features")
    scaled = keras.layers.Normalization(mean=mean, variance=std ** 2, name="standardise")(inputs)
    return keras.Model(inputs, head(scaled), name="similar_finder_adapter")


def save_head(model, path: Path, info: dict) -> Path:
    """Save atomically: Keras writes a temporary ``.keras`` file, renamed over ``path`` once complete."""
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:  # Keras wants a file name ending in .keras
        model.save(tmp)
    write_json(path.with_suffix(".json"), {**info, "sha256": file_sha256(path)})
    return path


PLAIN_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def blended_model(head, weight: float, plain=None):
    """The adapter as saved: ``sqrt(1-w)`` x the head's unit vector beside ``sqrt(w)`` x the plain unit
    vector, so that cosine similarity is ``(1-w)`` adapted + ``w`` plain. ``plain`` maps the adapter's
    input to the plain vector (default: the input is the plain vector). The plain part is not centred:
    the recommender centres for ranking, and its domain gate needs the uncentred vectors."""
    import keras

    if weight <= 0:
        return head
    inputs = keras.Input(head.input_shape[1:], name="features")
    unit = keras.layers.UnitNormalization(name="plain_unit")(inputs if plain is None else plain(inputs))
    parts = [keras.layers.Rescaling(float(np.sqrt(weight)), name="plain_weight")(unit)]
    if weight < 1:
        parts.append(keras.layers.Rescaling(float(np.sqrt(1 - weight)), name="adapted_weight")(head(inputs)))
    outputs = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="blend")(parts)
    return keras.Model(inputs, outputs, name="similar_finder_adapter")


def copy_tail(layers, input_shape, *, trainable: bool, prefix: str):
    """The backbone's last ``layers`` as a model of their own, with their pretrained weights.

    Batch normalisation keeps its ImageNet statistics (a few thousand photos
    would only make them worse); with ``trainable`` the convolutions learn.
    """
    import keras

    inputs = keras.Input(input_shape)
    x = inputs
    copies = []
    for layer in layers:
        config = {**layer.get_config(), "name": prefix + layer.name}
        copy = layer.__class__.from_config(config)
        frozen = isinstance(copy, keras.layers.BatchNormalization) or not trainable
        x = copy(x, training=False) if isinstance(copy, keras.layers.BatchNormalization) else copy(x)
        copy.set_weights(layer.get_weights())
        copy.trainable = not frozen
        copies.append(copy)
    return keras.Model(inputs, x, name=prefix + "tail")


# The default's family: the MLP head (``loss``), and two closed-form linear projections a few photos a class can
# already fit — shrinkage LDA and a linear probe (a logistic regression's class scores) — each blended with the
# plain features at one of PLAIN_WEIGHTS (weight 1: the plain features alone).
METHODS = ("head", "lda", "probe")
# From this many photos in the median class the MLP head is trained (as before issue 21), below it the projections
# are. bench/fewshot_bench.py: at 5 to 20 photos a class the head lost to the plain features or to LDA on clothing
# and CIFAR-10 (clothing, 5 a class: 0.70 against plain 0.74), the projections chosen by halvings beat both; at 50
# a class the head was best (clothing 0.786, the projections' choice 0.778 with a fifth to choose by).
HEAD_FROM_PER_CLASS = 40
CV_REPEATS = 3  # the few-shot choice: 3 random halvings of the training photos, each half scored once
PROBE_C = 0.1  # the probe's inverse regularisation: strong, since a few photos a class span little of 1,280-d


def linear_projection(features: np.ndarray, labels, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of a closed-form projection trained on ``features``: the vectors are ``x @ W + b``.

    ``"lda"``: shrinkage LDA (Ledoit-Wolf shrinkage, so that a few photos a class in 1,280 dimensions still give
    a usable covariance), onto its ``classes - 1`` discriminant directions; ``"probe"``: a multinomial logistic
    regression on standardised features, the class scores (two classes: the score and its negative).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    check_choice("projection", method, ("lda", "probe"))
    x, labels = np.asarray(features, np.float64), np.asarray(labels)
    if method == "lda":
        # Post-ReLU features have dimensions that are 0 on every photo of a small set: they make the
        # within-class scatter singular even shrunk, and carry nothing; they get a weight of 0.
        used = x.std(0) > 1e-6
        with warnings.catch_warnings():  # a class of one photo: sklearn warns, and its covariance is 0, as it should be
            warnings.filterwarnings("ignore", "Only one sample available", UserWarning)
            try:
                lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x[:, used], labels)
            except np.linalg.LinAlgError:
                # With one or two photos a class the Ledoit-Wolf estimate can leave the scatter singular; full
                # shrinkage (a multiple of the identity) always works: the projection onto the class means.
                lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=1.0).fit(x[:, used], labels)
        # transform is affine: read its weights off the origin and the unit vectors, whatever sklearn stores.
        bias = lda.transform(np.zeros((1, used.sum())))[0]
        weights = np.zeros((x.shape[1], len(bias)))
        weights[used] = lda.transform(np.eye(int(used.sum()))) - bias
        return weights.astype(np.float32), bias.astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegression(C=PROBE_C, max_iter=2000).fit((x - mean) / std, labels)
    weights = (probe.coef_ / std).T
    bias = probe.intercept_ - (mean / std) @ probe.coef_.T
    if weights.shape[1] == 1:
        weights, bias = np.c_[weights, -weights], np.r_[bias, -bias]
    return weights.astype(np.float32), bias.astype(np.float32)


def linear_head(weights: np.ndarray, bias: np.ndarray):
    """A :func:`linear_projection` as a Keras head (raw features in, unit vectors out), saved like the MLP head."""
    import keras

    inputs = keras.Input((weights.shape[0],), name="features")
    dense = keras.layers.Dense(weights.shape[1], name="projection")
    outputs = keras.layers.UnitNormalization(name="unit")(dense(inputs))
    dense.set_weights([weights, bias])
    return keras.Model(inputs, outputs, name="similar_finder_adapter")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _blend(adapted: np.ndarray, plain: np.ndarray, weight: float) -> np.ndarray:
    """What :func:`blended_model` computes, in NumPy: to score candidates without building a model each."""
    return np.hstack([np.sqrt(1 - weight) * _unit(adapted), np.sqrt(weight) * _unit(plain)])


def _linear_scores(features, labels, fit, held, methods, *, among: bool = False) -> dict:
    """``{(method, weight): retrieval scores}`` of the linear methods fitted on rows ``fit``: rows ``held``
    searched among rows ``fit``, or with ``among`` among themselves (both sides unseen, as a user's new photos)."""
    scores = {}
    for method in methods:
        weights, bias = linear_projection(features[fit], labels[fit], method)
        for weight in PLAIN_WEIGHTS:
            project = (lambda x: _blend(x @ weights + bias, x, weight))
            scores[(method, weight)] = (retrieval_among(project(features[held]), labels[held]) if among else
                                        retrieval_against(project(features[held]), labels[held],
                                                          project(features[fit]), labels[fit]))
    return scores


def _best(scores: dict, by: str = "precision@5"):
    """The best score ``by``; among equals the most plain, then the simplest method (the least that can go wrong)."""
    simplicity = {"probe": 0, "lda": 1, "head": 2}
    return max(scores, key=lambda c: (round(scores[c][by], 6), c[1], -simplicity[c[0]]))


def _mean_scores(runs: list[dict]) -> dict:
    return {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}


def fit_adapter(features: np.ndarray, labels, *, loss: str = "arcface", epochs: int = 60, dim: int = 128,
                random_state: int = 0, tail=None, flipped: np.ndarray | None = None, methods=None):
    """Choose and train an adapter on ``features`` with ``labels``, blended with the plain features.

    The candidates are ``methods``, each blended with the plain features at each of ``PLAIN_WEIGHTS`` (weight
    1 is the plain features, so a candidate that does not beat them on photos held out is not chosen). By
    default, the MLP head with ``loss`` (``("head",)``) once the median class has ``HEAD_FROM_PER_CLASS``
    photos: a stratified fifth is held out, stops its training and chooses the blend. Below that, shrinkage
    LDA and the linear probe (``("lda", "probe")``), scored by random halvings of the training photos
    (``CV_REPEATS`` times both ways: fitted on one half, the other half searched among itself) and the chosen
    one refitted on all of them. Returns ``(model, report)``; ``report`` has the held-out (or halvings')
    precision@5 and mAP, plain and adapted, the ``method`` (``"plain"`` when nothing beat the plain features),
    the plain weight, the epochs run and every candidate's precision@5.

    With ``tail`` (the backbone's last layers, see :meth:`Backbone.tail`), ``features`` are the activations
    that feed them (``flipped``: of the mirrored photos), and the MLP head is trained with those layers
    fine-tuned: the only candidate.
    """
    import keras

    features, labels = np.asarray(features, np.float32), np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if counts.max() < 2:
        raise UsageError("adapting needs classes with at least 2 photos: some are held out to check the head")
    if tail is not None:
        methods = ("head",)
    elif methods is None:
        methods = ("head",) if np.median(counts) >= HEAD_FROM_PER_CLASS else ("lda", "probe")
    methods = tuple(methods)
    for method in methods:
        check_choice("adapter method", method, METHODS)
    if "head" in methods and len(methods) > 1:
        raise UsageError("the MLP head is chosen on its own validation photos, the projections by halvings of the "
                         "training photos: pass methods=('head',) or projections only")
    plain_part, run, head = None, 0, None
    if methods == ("head",):
        fit, held = stratified_split(labels, VALIDATION_SHARE, random_state=random_state + 1)
        if tail is None:
            head, run = train_head(features[fit], labels[fit], loss=loss, epochs=epochs, dim=dim,
                                   validation=(features[held], labels[held]), random_state=random_state)
        else:
            keras.utils.set_random_seed(random_state)
            shape = features.shape[1:]
            tuned = copy_tail(tail, shape, trainable=True, prefix="tuned")
            inputs = keras.Input(shape, name="activations")
            head = keras.Model(inputs, _head(tuned.output_shape[-1], dim, 512, 0.2)(tuned(inputs)), name="tuned_head")
            run = train_embedding(head, features[fit], labels[fit], validation=(features[held], labels[held]),
                                  flipped=None if flipped is None else flipped[fit], loss=loss, dim=dim,
                                  epochs=epochs, learning_rate=3e-4, random_state=random_state)
            plain_part = copy_tail(tail, shape, trainable=False, prefix="plain")
        scores = {}
        for weight in PLAIN_WEIGHTS:
            model = blended_model(head, weight, plain_part)
            scores[("head", weight)] = retrieval_against(embed(model, features[held]), labels[held],
                                                         embed(model, features[fit]), labels[fit])
        folds, train_rows, held_rows = 1, int(len(fit)), int(len(held))
    else:
        from sklearn.model_selection import RepeatedStratifiedKFold

        # Halves, both ways, three times: a projection is fitted on one half and the other half is searched
        # among itself, as new photos are. Searching held-out photos among the photos a projection was fitted
        # on flatters it (they are what it pulled together): so scored, the probe beat the plain features on
        # 5 CIFAR-10 photos a class and lost to them by 0.08 on the test photos.
        halves = RepeatedStratifiedKFold(n_splits=2, n_repeats=CV_REPEATS, random_state=random_state)
        runs = [_linear_scores(features, labels, fit, held, methods, among=True)
                for fit, held in halves.split(features, labels)]
        scores = {candidate: _mean_scores([r[candidate] for r in runs]) for candidate in runs[0]}
        folds, train_rows, held_rows = len(runs), int(len(labels)), int(len(labels) // 2)
    # mAP where the held-out photos are a few a class: precision@5 of 2 photos a class is too coarse to choose by.
    method, weight = _best(scores, "precision@5" if methods == ("head",) else "mAP")
    plain_key = next(c for c in scores if c[1] >= 1)
    if weight >= 1:
        method = "plain"
    report = {"plain": scores[plain_key], "adapted": scores[(method if method != "plain" else plain_key[0], weight)],
              "method": method, "plain_weight": weight, "epochs": run, "train": train_rows, "held_out": held_rows,
              "cv_folds": folds, "candidates": {f"{m} {w:g}": s["precision@5"] for (m, w), s in scores.items()}}
    if head is not None:
        return blended_model(head, weight, plain_part), report
    if method == "plain":
        # A head is needed to give the model its shape; with weight 1 it is never called.
        return blended_model(linear_head(np.eye(features.shape[1], 2, dtype=np.float32), np.zeros(2, np.float32)),
                             1.0), report
    return blended_model(linear_head(*linear_projection(features, labels, method)), weight), report


def baseline_projections(features: np.ndarray, labels, train: np.ndarray, test: np.ndarray, *,
                         k: int = 5) -> dict:
    """Retrieval among rows ``test`` with projections fitted on rows ``train`` alone, unblended: the simple
    baselines an adapter has to beat (``{"shrinkage LDA": scores, "linear probe": scores}``)."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels)
    out = {}
    for name, method in (("shrinkage LDA", "lda"), ("linear probe", "probe")):
        weights, bias = linear_projection(features[train], labels[train], method)
        out[name] = retrieval_among(features[test] @ weights + bias, labels[test], k=k)
    return out
