"""Next-token batches from a byte corpus, reproducible per step."""

from __future__ import annotations

import torch
from torch import Tensor

from .corpus import Corpus, DataError, check_positive, step_generator

_TRAIN_STREAM = 0x7E47
_VAL_STREAM = 0x7A11


class TokenBatches:
    """``batch(step)`` -> (x, y) int64 (B, T), y = x shifted by one, at random offsets of the train split.

    The offsets come from a generator seeded by (seed, step) only, so batch k is identical on every run
    and does not depend on which batches were drawn before (resuming, comparing optimizers). Validation
    batches do not depend on ``seed`` so validation losses of runs with different seeds compare.
    """

    def __init__(
        self,
        corpus: Corpus,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        vocab_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.corpus = corpus
        self.batch_size = check_positive("batch_size", batch_size)
        self.seq_len = check_positive("seq_len", seq_len)
        self.seed = int(seed)
        self.device = torch.device(device)
        if corpus.kind == "random":
            if vocab_size is None:
                raise DataError("random tokens need vocab_size: pass the model's vocabulary size")
            self.vocab_size = check_positive("vocab_size", vocab_size)
            self._train = self._val = None
        else:
            byte_vocab = corpus.vocab_size or 256
            if vocab_size is not None and vocab_size < byte_vocab:
                raise DataError(
                    f"model vocabulary {vocab_size} is smaller than the {byte_vocab} byte tokens: "
                    f"use a model with vocab_size >= {byte_vocab}"
                )
            self.vocab_size = byte_vocab if vocab_size is None else int(vocab_size)
            if seq_len + 1 > corpus.train.numel():
                raise DataError(
                    f"seq_len {seq_len} needs {seq_len + 1} tokens but the train split has "
                    f"{corpus.train.numel()}: pass a shorter seq_len or more text"
                )
            # uint8 on the device: 1 byte per token, and each batch moves only B offsets.
            self._train = corpus.train.to(self.device)
            self._val = corpus.val.to(self.device)
        self._window = torch.arange(self.seq_len + 1, device=self.device)

    @property
    def description(self) -> str:
        return f"{self.corpus.description}; batches {self.batch_size} x {self.seq_len} tokens"

    def _windows(self, data: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        chunk = data[offsets.to(self.device)[:, None] + self._window].long()
        return chunk[:, :-1], chunk[:, 1:]

    def _random(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        ids = ids.to(self.device)
        return ids[:, :-1], ids[:, 1:]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch for ``step``: same (seed, step), same batch."""
        generator = step_generator(self.seed, step, _TRAIN_STREAM)
        if self._train is None:
            return self._random(generator)
        high = self._train.numel() - self.seq_len  # last valid offset + 1
        offsets = torch.randint(0, high, (self.batch_size,), generator=generator)
        return self._windows(self._train, offsets)

    def val_batches(self, n_batches: int = 8) -> list[tuple[Tensor, Tensor]]:
        """Fixed validation batches: windows evenly spaced over the validation split, the same every call."""
        check_positive("n_batches", n_batches)
        if self._val is None:
            return [self._random(step_generator(0, i, _VAL_STREAM)) for i in range(n_batches)]
        if self._val.numel() < self.seq_len + 1:
            raise DataError(
                f"the validation split has {self._val.numel()} tokens, fewer than seq_len + 1 = {self.seq_len + 1}: "
                "pass a shorter seq_len, a larger val_fraction or more text"
            )
        count = n_batches * self.batch_size
        last = self._val.numel() - self.seq_len - 1
        offsets = torch.linspace(0, last, count, dtype=torch.float64).round().long()
        return [self._windows(self._val, chunk) for chunk in offsets.split(self.batch_size)]
