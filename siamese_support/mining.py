"""Online negative mining for the triplet loss: semi-hard and hard negatives within a batch.

The keras.io example draws one random negative per anchor, once, in its input pipeline.
Most random negatives are already far from their anchor and cost nothing, so training
learns little from them. FaceNet (Schroff, Kalenichenko & Philbin 2015) chooses negatives
online instead, inside each batch, from the embeddings the network computes at that step.
The triplet script's loss (`compute_loss`, under every backend) asks this module for each
anchor's negative; the masked distance matrices and the selection live here, written with
`keras.ops` so that they run inside the compiled training step (with XLA too).

A batch holds B pairs (anchor i, positive i). The candidate negatives of anchor i are the
2B - 2 images of the other pairs: every anchor and every positive of pair j != i, never an
image of pair i itself. The candidates are numbered 0 to 2B - 1: the anchors first, then
the positives, so that candidate k belongs to pair k mod B. Distances are squared L2
distances, those of the triplet loss.

- `semi-hard`: the closest candidate that is farther from the anchor than its positive.
  If any candidate is semi-hard in FaceNet's sense, d(A, P) < d(A, N) < d(A, P) + margin,
  this is the closest such, so the margin is not needed to choose. Where none is
  semi-hard, the rule still applies: if some candidates lie beyond the margin, the closest
  of them (the triplet then costs nothing; the hard candidates, closer than the positive,
  are passed over); if all are hard, the farthest, the least hard one. FaceNet warns that
  the hardest negatives, early in training, can collapse the embedding to one point. This
  is the rule of TensorFlow Addons' `TripletSemiHardLoss` (and of `tf.contrib`'s
  `triplet_semihard_loss` before it), which users of the tutorial reach for.
- `hard`: the closest candidate, whatever its distance.

The choice is not differentiated (the indices come from distances computed on
`stop_gradient` copies of the embeddings); the loss then reads the chosen negatives'
embeddings, through which the gradients flow.
"""

from keras import ops

from siamese_support.command_line import NEGATIVES_CHOICES

# The strategies that choose negatives in the training step; "random" keeps the dataset's.
MINED_NEGATIVES = tuple(choice for choice in NEGATIVES_CHOICES if choice != "random")


def checked_strategy(strategy):
    """`strategy` if it is one of `--negatives`' choices; a ValueError otherwise."""
    if strategy not in NEGATIVES_CHOICES:
        raise ValueError(
            f"negatives must be one of {', '.join(NEGATIVES_CHOICES)}, got {strategy!r}"
        )
    return strategy


def check_batch_size(batch_size, training_pairs, strategy="random", replicas=1):
    """Refuse a batch size that cannot train: above the training pairs, or too small to mine.

    Under `tf.distribute` each replica mines in its own share of the batch (batch_size /
    replicas pairs, never searching the other replicas' shares), and so does each device
    under JAX's `DataParallel`: mining needs two pairs per replica at least.
    """
    if batch_size > training_pairs:
        raise ValueError(
            f"--batch-size {batch_size} is larger than the {training_pairs} training pairs; "
            "lower --batch-size or use more pairs"
        )
    if strategy in MINED_NEGATIVES and batch_size < 2 * replicas:
        per_replica = "" if replicas == 1 else f" on each of the {replicas} replicas"
        raise ValueError(
            f"--negatives {strategy} chooses each anchor's negative among the other pairs of "
            f"its batch{per_replica}: --batch-size must be at least {2 * replicas}, got "
            f"{batch_size}"
        )


def candidate_distances(anchor_embeddings, positive_embeddings):
    """Distances from each anchor to every candidate, whether each is allowed, d(A, P).

    Returns `(distances, allowed, positive_distances)`: `distances[i, k]` is the squared L2
    distance from anchor i to candidate k (anchors first, then positives; shape B x 2B),
    `allowed[i, k]` is False for the two images of pair i itself, and
    `positive_distances[i]` is d(A_i, P_i). The differences are formed explicitly rather
    than as |a|^2 + |c|^2 - 2 a.c, which can round a candidate across d(A, P).
    """
    candidates = ops.concatenate([anchor_embeddings, positive_embeddings], axis=0)
    differences = ops.expand_dims(anchor_embeddings, 1) - ops.expand_dims(candidates, 0)
    distances = ops.sum(ops.square(differences), axis=-1)
    positive_distances = ops.sum(ops.square(anchor_embeddings - positive_embeddings), axis=-1)
    pairs = ops.arange(ops.shape(anchor_embeddings)[0])
    candidate_pairs = ops.concatenate([pairs, pairs], axis=0)
    allowed = ops.not_equal(ops.expand_dims(pairs, 1), ops.expand_dims(candidate_pairs, 0))
    return distances, allowed, positive_distances


def select_negatives(anchor_embeddings, positive_embeddings, strategy):
    """Each anchor's negative as a candidate index (anchors first, then positives).

    Returns `(indices, found)`: `found[i]` is False when the batch holds no other pair (a
    batch of one pair), and `indices[i]` then means nothing. `strategy` is "semi-hard" or
    "hard" (see the module's docstring for the rules).
    """
    if strategy not in MINED_NEGATIVES:
        raise ValueError(f"select_negatives mines {' or '.join(MINED_NEGATIVES)}, not {strategy!r}")
    # The choice is not differentiated: it is made on copies that stop the gradient.
    anchor_embeddings = ops.stop_gradient(anchor_embeddings)
    positive_embeddings = ops.stop_gradient(positive_embeddings)
    distances, allowed, positive_distances = candidate_distances(
        anchor_embeddings, positive_embeddings
    )
    found = ops.any(allowed, axis=1)
    infinity = ops.cast(float("inf"), distances.dtype)
    if strategy == "hard":
        return ops.argmin(ops.where(allowed, distances, infinity), axis=1), found
    farther = ops.greater(distances, ops.expand_dims(positive_distances, 1))
    farther = ops.logical_and(allowed, farther)
    closest_farther = ops.argmin(ops.where(farther, distances, infinity), axis=1)
    farthest = ops.argmax(ops.where(allowed, distances, -infinity), axis=1)
    return ops.where(ops.any(farther, axis=1), closest_farther, farthest), found


def mine_negatives(anchor_embeddings, positive_embeddings, strategy, groups=1):
    """The chosen negatives' embeddings (B x D), and which anchors have one.

    The embeddings are gathered from the anchors' and positives' own embeddings, so the
    loss's gradient flows through them into the network; only the choice is not
    differentiated. Returns `(negative_embeddings, found)`; see `select_negatives`.

    `groups` > 1 cuts the batch into that many equal consecutive shares and mines within
    each: under JAX's `DataParallel` the loss sees the global batch, and each device's
    share is mined on its own, as each replica's is under `tf.distribute`.
    """
    if groups > 1:
        shares = zip(
            ops.split(anchor_embeddings, groups),
            ops.split(positive_embeddings, groups),
            strict=True,
        )
        mined = [mine_negatives(anchor, positive, strategy) for anchor, positive in shares]
        return tuple(ops.concatenate(parts, axis=0) for parts in zip(*mined, strict=True))
    indices, found = select_negatives(anchor_embeddings, positive_embeddings, strategy)
    candidates = ops.concatenate([anchor_embeddings, positive_embeddings], axis=0)
    return ops.take(candidates, indices, axis=0), found
