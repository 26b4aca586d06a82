"""Poisson sampling: inclusion rate, batch size, padding, the DP step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_dpscale as kd
from keras_dpscale import accounting
from keras_dpscale import data

N, B = 1000, 50


def arrays(n=N):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 1)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # identify examples
    images[:, 0, 1, 0] = np.arange(n) // 256
    return images, np.arange(n) % 3


def example_ids(x, mask):
    pixels = np.rint((np.asarray(x) * 0.5 + 0.5) * 255).astype(int)
    ids = pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 1, 0]
    return ids[np.asarray(mask) > 0]


def test_inclusion_rate_and_mean_batch_size():
    images, labels = arrays()
    steps = 400
    ds = data.poisson_dataset(images, labels, B, steps=steps)
    counts = np.zeros(N)
    sizes = []
    rows = None
    for x, y, extra in ds:
        mask = extra["dp_mask"].numpy()
        rows = len(mask)
        ids = example_ids(x, mask)
        assert len(set(ids)) == len(ids)  # each example at most once a step
        counts[ids] += 1
        sizes.append(mask.sum())
        assert np.all(np.asarray(x)[mask == 0] == 0)  # padding is zeros
    q = B / N
    assert rows == accounting.poisson_max_batch_size(N, B, 1e-18)
    assert abs(np.mean(sizes) - B) < 6 * np.sqrt(B * (1 - q) / steps)
    assert abs(counts.mean() / steps - q) < 0.003
    # Independent inclusion: per-example counts are Binomial(steps, q).
    assert 0.7 < counts.var() / (steps * q * (1 - q)) < 1.3


def samples(ds):
    return [tuple(sorted(example_ids(x, m["dp_mask"]))) for x, _, m in ds]


def test_the_sample_is_secret_and_fresh_for_every_pass():
    # Item 3: the sample is not a function of the (public) seed; item 4:
    # iterating the same stream again draws a new sample, never a replay.
    images, labels = arrays()
    ds = data.poisson_dataset(images, labels, B, seed=0, steps=3)
    again = data.poisson_dataset(images, labels, B, seed=0, steps=3)
    assert kd.sampling.of(ds) == kd.sampling.Sampling(
        "poisson",
        kd.sampling.of(ds).overflow_probability,
        batch_size=B,
        num_examples=len(images),
        accumulation_steps=1,
    )
    first, second, other = samples(ds), samples(ds), samples(again)
    assert len(first) == 3
    assert not set(first) & set(second)  # q^B chance of a repeat: none
    assert not set(first) & set(other)


def test_public_sampling_seed_is_reproducible_and_marked_public():
    images, labels = arrays()
    a = data.poisson_dataset(
        images, labels, B, 3, num_views=2, public_sampling_seed=5
    )
    b = data.poisson_dataset(
        images, labels, B, 3, num_views=2, public_sampling_seed=5
    )
    xa, xb = next(iter(a))[0], next(iter(b))[0]
    np.testing.assert_array_equal(xa, xb)  # same sample, same views
    assert xa.shape[1:] == (2, 8, 8, 1)
    assert kd.sampling.of(a).kind == "public"
    assert not kd.sampling.of(a).amplified


def test_overflow_keeps_at_most_the_padded_size():
    images, labels = arrays()
    ds = data.poisson_dataset(
        images, labels, B, steps=50, overflow_probability=0.3
    )
    sizes = [float(tf.reduce_sum(m["dp_mask"])) for _, _, m in ds]
    rows = accounting.poisson_max_batch_size(N, B, 0.3)
    assert max(sizes) == rows  # some steps overflowed and were truncated
    assert rows < B + 5


def test_accumulation_cuts_a_logical_batch_into_physical_ones():
    images, labels = arrays()
    seed = dict(public_sampling_seed=5)
    logical = list(data.poisson_dataset(images, labels, B, steps=2, **seed))
    physical = list(
        data.poisson_dataset(
            images, labels, B, steps=2, accumulation_steps=2, **seed
        )
    )
    assert len(physical) == 4
    rows = accounting.poisson_max_batch_size(N, B, 1e-18)
    for i, (x, _, m) in enumerate(logical):
        parts = physical[2 * i : 2 * i + 2]
        assert len(m["dp_mask"]) == rows
        assert [len(p[2]["dp_mask"]) for p in parts] == [-(-rows // 2)] * 2
        joined = np.concatenate(
            [example_ids(p[0], p[2]["dp_mask"]) for p in parts]
        )
        # The same sample (same seed and step), cut into two batches.
        np.testing.assert_array_equal(
            np.sort(joined), np.sort(example_ids(x, m["dp_mask"]))
        )


@pytest.mark.parametrize("replicas, pipelines", [(2, 1), (4, 2)])
def test_hosts_sample_their_own_shards_into_one_poisson_sample(
    replicas, pipelines
):
    # Each input pipeline samples the examples it owns (index mod P) from
    # its own secret: the union is a Poisson sample of all N examples, with
    # no secret shared between hosts.
    images, labels = arrays()
    steps = 150
    per_pipeline = []
    for p in range(pipelines):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=pipelines,
            input_pipeline_id=p,
            num_replicas_in_sync=replicas,
        )
        ds = data.poisson_dataset(
            images,
            labels,
            B,
            steps=steps,
            accumulation_steps=2,
            input_context=ctx,
        )
        batches = list(ds)
        per_step = 2 * replicas // pipelines
        assert len(batches) == steps * per_step
        rows = {len(m["dp_mask"]) for _, _, m in batches}
        assert len(rows) == 1  # every replica gets the same padded size
        ids = [
            np.concatenate(
                [
                    example_ids(x, m["dp_mask"])
                    for x, _, m in batches[t * per_step : (t + 1) * per_step]
                ]
            )
            for t in range(steps)
        ]
        assert all(np.all(i % pipelines == p) for i in ids)
        per_pipeline.append(ids)
    counts = np.zeros(N)
    for t in range(steps):
        step = np.concatenate([ids[t] for ids in per_pipeline])
        assert len(set(step)) == len(step)  # no example twice in a step
        counts[step] += 1
    assert abs(counts.mean() / steps - B / N) < 0.005


class ListSource:
    """A random-access source of variable-size images, like tfds'."""

    def __init__(self, n):
        self.n = n
        self.reads = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        size = 6 + i % 5  # images of different sizes
        image = np.full((size, size, 1), i % 256, np.uint8)
        image[0, 1, 0] = i // 256
        return {"image": image, "label": i % 3}


def test_source_dataset_reads_only_the_sampled_examples():
    source = ListSource(N)

    def preprocess(image):  # fixed size, keeps the id pixels
        image = tf.image.crop_to_bounding_box(image, 0, 0, 6, 6)
        return data.normalize(tf.image.resize(image, (8, 8), "nearest"))

    ds = data.poisson_source_dataset(
        source, B, preprocess=preprocess, steps=20, num_views=2,
        augment=lambda x, seed: x,
    )  # fmt: skip
    sizes = []
    for x, y, m in ds:
        mask = m["dp_mask"].numpy()
        assert x.shape[1:] == (2, 8, 8, 1)
        ids = example_ids(x[:, 0], mask)
        np.testing.assert_array_equal(np.asarray(y)[mask > 0], ids % 3)
        assert np.all(np.asarray(x)[mask == 0] == 0)
        sizes.append(mask.sum())
    rows = accounting.poisson_max_batch_size(N, B, 1e-18)
    assert len(mask) == rows
    assert abs(np.mean(sizes) - B) < 6 * np.sqrt(B / 20)
    # Reads: the sampled examples only, plus example 0 once (the padding).
    assert len(source.reads) == sum(sizes) + 1


def test_overflow_probability_and_max_batch_size():
    for p in (1e-6, 1e-18):
        m = accounting.poisson_max_batch_size(60_000, 256, p)
        assert accounting.poisson_overflow_probability(60_000, 256, m) <= p
        assert accounting.poisson_overflow_probability(60_000, 256, m - 1) > p


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_dp_training_on_poisson_batches_is_accounted(accumulation_steps):
    images, labels = arrays()
    ds = data.poisson_dataset(
        images, labels, B, steps=6, accumulation_steps=accumulation_steps
    )
    model = kd.DPSequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            batch_size=B,
            num_examples=N,
            target_delta=1e-5,
            sampling="poisson",
            accumulation_steps=accumulation_steps,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(ds, epochs=1, verbose=0)
    rows = accounting.poisson_max_batch_size(N, B, 1e-18)
    rows = accumulation_steps * -(-rows // accumulation_steps)
    overflow = accounting.poisson_overflow_probability(N, B, rows)
    assert model.privacy_ledger() == [
        accounting.Segment(1.0, B, "poisson", 6, rows, N, overflow)
    ]
    want = accounting.compute_epsilon(1.0, B, N, 6, 1e-5)
    assert history.history["epsilon"][-1] == pytest.approx(want)
    assert "truncation adds" in model.privacy_statement()


class PoissonArrayRecordTest(tfds.core.GeneratorBasedBuilder):
    """A tiny tfds dataset of variable-size JPEG-free images."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            size = 9 + i % 4
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % 3}


def test_poisson_from_a_tfds_array_record_data_source(tmp_path):
    pytest.importorskip("array_record")
    builder = PoissonArrayRecordTest(
        data_dir=str(tmp_path), file_format="array_record"
    )
    builder.download_and_prepare()
    source = tfds.data_source(
        "poisson_array_record_test", data_dir=str(tmp_path), split="train"
    )
    ds = data.train_dataset(
        source,
        batch_size=6,
        seed=0,
        steps=3,
        num_views=2,
        preprocess=lambda image: data.imagenet.preprocess(
            image, image_size=8, train=True, augmult=True
        ),
        augment=data.imagenet.augmult_crops(8),
    )
    rows = accounting.poisson_max_batch_size(60, 6, 1e-18)
    sampled = 0.0
    for x, y, m in ds:
        assert x.shape == (rows, 2, 8, 8, 3)
        assert np.all(np.isfinite(x))
        size = float(tf.reduce_sum(m["dp_mask"]))
        assert 0 <= size <= rows
        sampled += size
    # A step's secret sample is empty with probability 0.9^60 (0.2%); all
    # three with 0.9^180.
    assert sampled > 0
