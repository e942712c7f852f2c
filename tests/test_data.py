"""The data package: corpora without download, per-step reproducible batches, learnable synthetic tasks."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from muonprof.data import (
    SHAPES,
    Corpus,
    DataError,
    ImageBatches,
    TokenBatches,
    VectorBatches,
    load_corpus,
    step_generator,
)
from muonprof.data.corpus import DOC_SEPARATOR, _load_cached


def write_docs(folder: Path, count: int, extra: int = 0) -> dict[str, bytes]:
    """``count`` small text files, each with a unique marker so its split can be found."""
    docs = {}
    for i in range(count + extra):
        rel = f"sub{i % 3}/doc{i:03d}.txt"
        data = f"document {i:03d} marker-{i:03d}-end\n".encode() * 20
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        docs[rel] = data
    return docs


def logistic_accuracy(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (LBFGS, a fraction of a second)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mu) / sd, (xv - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xv @ w + b).argmax(1) == yv).float().mean().item()


# --- corpus -----------------------------------------------------------------------------------------------


def test_stdlib_corpus_loads_with_a_split_by_file() -> None:
    corpus = load_corpus()
    assert corpus.kind == "bytes" and corpus.vocab_size == 256 and corpus.split == "file"
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1
    assert corpus.train.numel() > 2_000_000 and corpus.val.numel() > 10_000
    assert corpus.files > 100 and 0 < corpus.val_files < corpus.files
    assert "standard library" in corpus.description and len(corpus.sha) == 12
    assert load_corpus("stdlib") is corpus  # cached in-process
    assert b"def " in bytes(corpus.train[:100_000].tolist())


def test_stdlib_corpus_is_deterministic() -> None:
    first = load_corpus()
    _load_cached.cache_clear()
    second = load_corpus()
    assert second is not first and second.sha == first.sha
    assert torch.equal(second.train, first.train) and torch.equal(second.val, first.val)


def test_folder_split_is_by_file_disjoint_and_stable(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "a", 40)
    corpus = load_corpus(tmp_path / "a", val_fraction=0.25)
    assert corpus.split == "file" and corpus.files == 40 and 0 < corpus.val_files < 40
    train, val = bytes(corpus.train.tolist()), bytes(corpus.val.tolist())
    in_val = set()
    for rel, data in docs.items():
        assert (data in train) != (data in val), rel  # each document in exactly one split
        if data in val:
            in_val.add(rel)
    assert len(in_val) == corpus.val_files
    assert len(train) + len(val) == sum(map(len, docs.values())) + len(DOC_SEPARATOR) * (40 - 2)
    # One more file moves no other document between splits.
    write_docs(tmp_path / "b", 40, extra=1)
    grown = load_corpus(str(tmp_path / "b"), val_fraction=0.25)
    grown_val = bytes(grown.val.tolist())
    assert all((docs[rel] in grown_val) == (rel in in_val) for rel in docs)


def test_folder_skips_binary_hidden_and_orders_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bravo text\n")
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / ".hidden").write_text("hidden text\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("cached\n")
    corpus = load_corpus(tmp_path, val_fraction=0.0)
    assert corpus.files == 2 and corpus.val.numel() == 0
    assert bytes(corpus.train.tolist()) == b"alpha text\n" + DOC_SEPARATOR + b"bravo text\n"


def test_single_file_splits_by_bytes(tmp_path: Path) -> None:
    text = b"".join(f"line {i}\n".encode() for i in range(2000))
    path = tmp_path / "one.txt"
    path.write_bytes(text)
    corpus = load_corpus(path, val_fraction=0.1)
    assert corpus.split == "bytes" and corpus.files == 1
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == text
    assert corpus.val.numel() == int(len(text) * 0.1)
    assert "split by bytes" in corpus.description


def test_max_bytes_caps_deterministically(tmp_path: Path) -> None:
    docs = write_docs(tmp_path, 10)
    size = len(next(iter(docs.values())))
    corpus = load_corpus(tmp_path, max_bytes=3 * size + 7, val_fraction=0.0)
    assert corpus.files == 4  # three whole files and the cut one
    assert corpus.train.numel() == 3 * size + 7 + 3 * len(DOC_SEPARATOR)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path / "folder")
    (tmp_path / "folder" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path / "folder")
    with pytest.raises(DataError, match="empty data source"):
        load_corpus("")
    for kwargs in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"max_bytes": 0}):
        with pytest.raises(DataError):
            load_corpus(**kwargs)


# --- token batches ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    folder = tmp_path_factory.mktemp("corpus")
    write_docs(folder, 30)
    return load_corpus(folder, val_fraction=0.2)


def test_token_batches_shapes_and_shift(small_corpus: Corpus) -> None:
    batches = TokenBatches(small_corpus, batch_size=4, seq_len=32, seed=1)
    x, y = batches.batch(0)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = small_corpus.train.long()
    windows = train.unfold(0, 33, 1)
    for row_x, row_y in zip(x, y):  # every sample is a real window of the train split
        full = torch.cat([row_x, row_y[-1:]])
        assert (windows == full).all(1).any()
    assert batches.vocab_size == 256 and "32 tokens" in batches.description


def test_token_batches_depend_on_seed_and_step_only(small_corpus: Corpus) -> None:
    a = TokenBatches(small_corpus, batch_size=8, seq_len=16, seed=3)
    b = TokenBatches(small_corpus, batch_size=8, seq_len=16, seed=3)
    in_order = [a.batch(k)[0] for k in range(6)]
    assert torch.equal(b.batch(5)[0], in_order[5])  # drawn first on a fresh object
    assert torch.equal(b.batch(2)[0], in_order[2])
    assert not torch.equal(in_order[0], in_order[1])
    other_seed = TokenBatches(small_corpus, batch_size=8, seq_len=16, seed=4)
    assert not torch.equal(other_seed.batch(5)[0], in_order[5])
    with pytest.raises(DataError, match="non-negative"):
        a.batch(-1)


def test_token_val_batches_are_fixed(small_corpus: Corpus) -> None:
    a = TokenBatches(small_corpus, batch_size=4, seq_len=16, seed=0)
    b = TokenBatches(small_corpus, batch_size=4, seq_len=16, seed=9)
    first, again, other = a.val_batches(3), a.val_batches(3), b.val_batches(3)
    assert len(first) == 3
    for (x1, y1), (x2, y2), (x3, _) in zip(first, again, other):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    val = bytes(small_corpus.val.tolist())
    assert bytes(first[0][0][0].tolist()) in val


def test_random_tokens() -> None:
    corpus = load_corpus("random")
    assert corpus.kind == "random" and corpus.train.numel() == 0
    batches = TokenBatches(corpus, batch_size=2, seq_len=64, seed=0, vocab_size=1000)
    x, y = batches.batch(7)
    assert x.shape == (2, 64) and x.dtype == torch.int64 and int(x.min()) >= 0 and int(x.max()) < 1000
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(TokenBatches(corpus, batch_size=2, seq_len=64, vocab_size=1000).batch(7)[0], x)
    assert len(batches.val_batches(2)) == 2
    with pytest.raises(DataError, match="vocab_size"):
        TokenBatches(corpus, batch_size=2, seq_len=8)


def test_token_batch_errors(small_corpus: Corpus, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="smaller than the 256 byte tokens"):
        TokenBatches(small_corpus, batch_size=2, seq_len=8, vocab_size=100)
    assert TokenBatches(small_corpus, batch_size=2, seq_len=8, vocab_size=50257).vocab_size == 50257
    with pytest.raises(DataError, match="seq_len"):
        TokenBatches(small_corpus, batch_size=2, seq_len=small_corpus.train.numel())
    with pytest.raises(DataError, match="batch_size"):
        TokenBatches(small_corpus, batch_size=0, seq_len=8)
    (tmp_path / "t.txt").write_bytes(b"abcdefghij" * 10)
    tiny = load_corpus(tmp_path / "t.txt", val_fraction=0.05)
    with pytest.raises(DataError, match="validation split"):
        TokenBatches(tiny, batch_size=1, seq_len=20).val_batches(1)


def test_step_generator_is_pure() -> None:
    assert torch.equal(torch.rand(4, generator=step_generator(1, 2)), torch.rand(4, generator=step_generator(1, 2)))
    assert not torch.equal(torch.rand(4, generator=step_generator(1, 2)), torch.rand(4, generator=step_generator(2, 1)))


# --- images -----------------------------------------------------------------------------------------------


def test_image_batches_shapes_and_determinism() -> None:
    images = ImageBatches(batch_size=16, seed=2)
    x, y = images.batch(3)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    x2, y2 = ImageBatches(batch_size=16, seed=2).batch(3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(images.batch(4)[0], x)
    val = images.val_batches(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, ImageBatches(batch_size=16, seed=5).val_batches(2)))
    gray = ImageBatches(image_size=12, channels=1, num_classes=len(SHAPES), batch_size=4).batch(0)[0]
    assert gray.shape == (4, 1, 12, 12) and torch.isfinite(gray).all()


def test_synthetic_images_are_learnable() -> None:
    """Translation-invariant features (log |FFT|) + logistic regression beat chance (10%) by far."""
    images = ImageBatches(image_size=16, batch_size=100, seed=0)
    x, y = map(torch.cat, zip(*[images.batch(s) for s in range(5)]))
    xv, yv = map(torch.cat, zip(*images.val_batches(3)))

    def features(batch: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.fft.rfft2(batch.mean(1)).abs()).flatten(1)

    assert logistic_accuracy(features(x), y, features(xv), yv, 10) > 0.3


def test_image_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="num_classes"):
        ImageBatches(num_classes=len(SHAPES) + 1, batch_size=2)
    with pytest.raises(DataError, match="unknown image source"):
        ImageBatches(batch_size=2, source="cifar")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="scikit-learn"):
        ImageBatches(batch_size=2, source="digits")


def test_digits_source_with_a_stand_in_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits path, on a stand-in for sklearn's bundled set (sklearn is not a dependency)."""
    gen = torch.Generator().manual_seed(0)
    fake = types.ModuleType("sklearn.datasets")
    target = torch.arange(120) % 10
    fake.load_digits = lambda: types.SimpleNamespace(  # type: ignore[attr-defined]
        images=(torch.rand(120, 8, 8, generator=gen) * 16).numpy(), target=target.numpy()
    )
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    digits = ImageBatches(image_size=16, channels=3, batch_size=8, source="digits")
    x, y = digits.batch(0)
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.int64 and torch.equal(x, digits.batch(0)[0])
    assert len(digits.val_batches(2)) == 2 and "digits" in digits.description
    with pytest.raises(DataError, match="10 classes"):
        ImageBatches(num_classes=5, batch_size=2, source="digits")


# --- vectors ----------------------------------------------------------------------------------------------


def test_vector_batches_shapes_and_determinism() -> None:
    vectors = VectorBatches(batch_size=32, seed=1)
    x, y = vectors.batch(0)
    assert x.shape == (32, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(VectorBatches(batch_size=32, seed=1).batch(0)[0], x)
    assert not torch.equal(vectors.batch(1)[0], x)
    assert not torch.equal(VectorBatches(batch_size=32, seed=2).batch(0)[0], x)
    val = vectors.val_batches(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, VectorBatches(batch_size=32, seed=7).val_batches(2)))
    assert VectorBatches(in_features=4, num_classes=3, batch_size=5).batch(0)[0].shape == (5, 4)


def test_vectors_are_learnable_but_not_linear() -> None:
    """Linear beats chance; 1-nearest-neighbour (a non-linear rule) does clearly better still."""
    vectors = VectorBatches(batch_size=500, seed=0)
    x, y = map(torch.cat, zip(*[vectors.batch(s) for s in range(8)]))
    xv, yv = map(torch.cat, zip(*vectors.val_batches(2)))
    linear = logistic_accuracy(x, y, xv, yv, 10)
    nearest = (y[torch.cdist(xv, x).argmin(1)] == yv).float().mean().item()
    assert linear > 0.25 and nearest > linear + 0.15
