"""Evaluation metrics: accuracy at a threshold, ROC AUC, recall@k, cosine similarity.

The tutorials print one accuracy (MNIST) or two cosine similarities (triplet). Judging a
trained embedding needs a few more numbers, computed the same way for every run, in NumPy,
so they live here.
"""

import os

import numpy as np


def roc_auc(labels, distances):
    """Area under the ROC curve of "same digit" scored by a small distance.

    The probability that a random positive pair is closer than a random negative pair,
    ties counting half (the Mann-Whitney statistic).
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = -np.asarray(distances, np.float64).ravel()
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("roc_auc needs both positive and negative pairs")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank (1-based) over each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    run_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_ranks, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def best_threshold(labels, distances):
    """The distance threshold that classifies `labels` best, and its accuracy.

    Candidates are the midpoints between consecutive sorted distances (and both ends);
    a pair is called "same digit" when its distance is below the threshold.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    distances = np.asarray(distances, np.float64).ravel()
    order = np.argsort(distances, kind="mergesort")
    sorted_distances, sorted_labels = distances[order], labels[order]
    # With the threshold just above the k-th smallest distance, the first k pairs are
    # called positive: right for the positives among them and the negatives after them.
    positives_below = np.concatenate([[0], np.cumsum(sorted_labels)])
    negatives_above = (~sorted_labels).sum() - np.concatenate([[0], np.cumsum(~sorted_labels)])
    correct = positives_below + negatives_above
    # Only cut between distinct distances.
    valid = np.concatenate([[True], np.diff(sorted_distances) > 0, [True]])
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        threshold = sorted_distances[0] - 1e-6
    elif k == len(sorted_distances):
        threshold = sorted_distances[-1] + 1e-6
    else:
        threshold = (sorted_distances[k - 1] + sorted_distances[k]) / 2
    return float(threshold), float(correct[k] / len(labels))


def pair_metrics(train_labels, train_distances, test_labels, test_distances):
    """What metrics.json adds to the example's two accuracies, from the pairs' distances.

    The threshold is chosen on the training pairs, so that its test accuracy stays an
    unbiased figure; the ROC AUC scores the test distances at every threshold at once.
    """
    threshold, _ = best_threshold(train_labels, train_distances)
    predicted_same = np.ravel(test_distances) < threshold
    return {
        "test_roc_auc": roc_auc(test_labels, test_distances),
        "best_threshold": threshold,
        "best_threshold_accuracy": float(np.mean(predicted_same == np.ravel(test_labels))),
    }


def embed_digits(embed, images, batch_size=1024):
    """The embeddings of uint8 `images`, as one NumPy array: calls of `embed` (a Keras model,
    dropout off) on slices of `4 * batch_size` images scaled to [0, 1]."""
    from keras import ops

    step = batch_size * 4
    embeddings = []
    for start in range(0, len(images), step):
        batch = ops.cast(images[start : start + step], "float32") / 255.0
        embeddings.append(ops.convert_to_numpy(embed(batch)))
    return np.concatenate(embeddings)


def embedded_pair_distances(embed, distance, images, pairs, batch_size=1024):
    """`distance` between the embeddings of each index pair of uint8 `images`, as a 1-D array.

    Each image is embedded once, by calls of `embed` (a Keras model: dropout stays off)
    on slices of `4 * batch_size` images scaled to [0, 1], rather than `predict`, whose
    tracing took 0.3 s a run. The pairs' distances are taken `16 * batch_size` pairs at a
    time, which keeps the gathered embeddings small.
    """
    from keras import ops

    embeddings = embed_digits(embed, images, batch_size)
    distances = []
    for start in range(0, len(pairs), batch_size * 16):
        chunk = pairs[start : start + batch_size * 16]
        vectors = [embeddings[chunk[:, 0]], embeddings[chunk[:, 1]]]
        distances.append(ops.convert_to_numpy(distance(vectors)).ravel())
    return np.concatenate(distances)


def cosine_similarities(first, second):
    """Cosine similarity of each row of `first` with the same row of `second`.

    The example reports one number per batch from a `CosineSimilarity` metric, and uses
    the same metric object for the positive and then the negative similarity, so its
    "negative similarity" is the running mean of both. Here every triplet has its own.
    """
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.sum(first * second, axis=1) / np.maximum(norms, 1e-12)


def pairwise_squared_distances(first, second):
    """Matrix of squared L2 distances between every row of `first` and of `second`."""
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    squared = (
        np.sum(first**2, axis=1)[:, None]
        + np.sum(second**2, axis=1)[None, :]
        - 2 * first @ second.T
    )
    return np.maximum(squared, 0.0)


def triplet_accuracy(ap_distances, an_distances):
    """Fraction of triplets whose positive is closer to the anchor than the negative."""
    return float(np.mean(np.asarray(ap_distances) < np.asarray(an_distances)))


def recall_at_k(distance_matrix, ks=(1, 5, 10)):
    """Retrieval recall: row i's right answer is column i; is it among the k closest?

    Ties count against the right answer (it ranks behind every column at the same
    distance), so a model that maps everything to one point scores 0, not 1.
    """
    distance_matrix = np.asarray(distance_matrix)
    correct = np.diag(distance_matrix)[:, None]
    closer = np.sum(distance_matrix < correct, axis=1)
    tied = np.sum(distance_matrix == correct, axis=1) - 1
    rank = closer + tied
    return {k: float(np.mean(rank < k)) for k in ks}


def evaluate_triplets(anchors, positives, negative_indices):
    """Triplet accuracy, retrieval recall and similarities from validation embeddings.

    `anchors[i]` and `positives[i]` embed the images of validation pair i, each image once;
    `negative_indices` index `anchors + positives` and give the fixed validation triplets.
    For retrieval, each anchor (`left`) ranks all validation positives (`right`) by
    distance, the task of the Totally Looks Like paper.
    """
    anchors = np.asarray(anchors, np.float32)
    positives = np.asarray(positives, np.float32)
    negatives = np.concatenate([anchors, positives])[np.asarray(negative_indices)]
    ap_distances = np.sum((anchors - positives) ** 2, axis=1)
    an_distances = np.sum((anchors - negatives) ** 2, axis=1)
    distance_matrix = pairwise_squared_distances(anchors, positives)
    recalls = recall_at_k(distance_matrix)
    return {
        "triplet_accuracy": triplet_accuracy(ap_distances, an_distances),
        **{f"recall_at_{k}": value for k, value in recalls.items()},
        "ap_distances": ap_distances,
        "an_distances": an_distances,
        "positive_similarities": cosine_similarities(anchors, positives),
        "negative_similarities": cosine_similarities(anchors, negatives),
        "distance_matrix": distance_matrix,
        "embeddings": np.concatenate([anchors, positives]),
    }


def triplet_metrics(before, after):
    """The figures of `evaluate_triplets` before and after training, as metrics.json has them."""
    return {
        "triplet_accuracy_before": before["triplet_accuracy"],
        "triplet_accuracy": after["triplet_accuracy"],
        **{f"recall_at_{k}_before": before[f"recall_at_{k}"] for k in (1, 5, 10)},
        **{f"recall_at_{k}": after[f"recall_at_{k}"] for k in (1, 5, 10)},
        "positive_similarity": float(np.mean(after["positive_similarities"])),
        "negative_similarity": float(np.mean(after["negative_similarities"])),
    }


def triplet_run_metrics(history, before, after, seconds_caching):
    """What a triplet run's metrics.json starts with: the last val_loss, `triplet_metrics`."""
    val_loss = float(history[-1]["val_loss"]) if history else None
    metrics = {"val_loss": val_loss, **triplet_metrics(before, after)}
    return {**metrics, "seconds_caching": seconds_caching}


def save_triplet_run(run, embedding, settings, validation, data_dir, results, load_image=None):
    """Write what a triplet run adds to the example, then finish the run (`Run.finish`).

    `similarities.csv`, the plots (none when `load_image`, the images' loader, is None), the
    projector's files in `logs/validation/` (thumbnails only with `load_image`), the model,
    `history.csv` and, last, `metrics.json`. `validation` is the validation anchors,
    positives and negatives (`choose_negatives`' indices); `results` is `(before, after,
    seconds_caching, training pairs, skipped pairs)`. Returns whether this process wrote them.
    """
    before, after, seconds_caching, training_pairs, skipped = results
    anchors, positives, _ = validation
    run.write_csv(similarity_rows(*validation, data_dir, after), "similarities.csv")
    if run.writes_outputs and load_image is not None:
        from siamese_support import plots  # Matplotlib, only where a run draws

        figures = (before, after, anchors, positives, load_image)
        plots.plot_triplet_run(run.output_dir, run.history(), *figures)
    if run.writes_outputs:  # the validation embeddings for TensorBoard's projector
        from siamese_support import projector

        embedded = (after["embeddings"], anchors, positives, load_image)
        projector.write_projector_files(run.output_dir / "logs" / "validation", *embedded)
    metrics = triplet_run_metrics(run.history(), before, after, seconds_caching)
    metrics.update(training_pairs=training_pairs, validation_pairs=len(anchors))
    metrics["skipped_pairs"] = skipped
    return run.finish({"embedding.keras": embedding}, metrics, settings)


def summary_lines(before, after):
    """The last lines a triplet run prints: triplet accuracy and recall@1, before and after."""
    return (
        f"* Triplet accuracy: {before['triplet_accuracy']:.3f} before training, "
        f"{after['triplet_accuracy']:.3f} after\n* Recall@1: "
        f"{before['recall_at_1']:.3f} before training, {after['recall_at_1']:.3f} after"
    )


def similarity_rows(anchor_images, positive_images, negative_indices, data_dir, result):
    """One row per triplet of `evaluate_triplets`' `result`, for a CSV file.

    The anchor and positive by file name, the negative (an index into `anchor_images +
    positive_images`) by its path in `data_dir`; cosine similarities (6 decimals) and
    squared distances (6 significant digits).
    """
    pool = list(anchor_images) + list(positive_images)
    return [
        {
            "anchor": os.path.basename(anchor_images[row]),
            "positive": os.path.basename(positive_images[row]),
            "negative": os.path.relpath(pool[negative_indices[row]], data_dir),
            "positive_similarity": f"{result['positive_similarities'][row]:.6f}",
            "negative_similarity": f"{result['negative_similarities'][row]:.6f}",
            "positive_distance": f"{result['ap_distances'][row]:.6g}",
            "negative_distance": f"{result['an_distances'][row]:.6g}",
        }
        for row in range(len(anchor_images))
    ]
