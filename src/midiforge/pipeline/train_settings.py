"""The settings of ``midiforge train``: :class:`TrainSettings`, the one place each default is defined.

:data:`DEFAULTS` (the training settings' defaults, what run.json records) and the help texts of
the flags (:mod:`midiforge.pipeline.train`) are read from the dataclass fields.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields

from midiforge.errors import MidiforgeError
from midiforge.storage.cli_options import options_from_args
from midiforge.storage.store import StorageOptions

CLASS_WEIGHTINGS = ("none", "sqrt", "inverse")
PROGRESS = ("auto", "bar", "epoch", "none")
MEMBERSHIPS = ("auto", "local", "tf_config", "slurm")
MODEL_KEYS = ("embedding_dim", "lstm_units", "dropout")
MAX_VALIDATION_STEPS = 200


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs; plain values (travels to Ray workers as a dict).

    Defaults "chosen for the data": vocabularies of a few hundred tokens, corpora from a few
    hundred to a million pieces; two 256-unit LSTMs train at tens of thousands of tokens/s on
    a laptop CPU and far faster on a GPU with cuDNN.
    """

    shards: str
    model_dir: str
    epochs: int = 20
    batch_size: int = 64
    seq_len: int = 128
    embedding_dim: int = 128
    lstm_units: tuple = (256, 256)
    dropout: float = 0.2
    learning_rate: float = 0.002
    clipnorm: float = 1.0
    steps_per_epoch: int = 0           # 0: one pass over the training windows
    validation_steps: int = 0          # 0: all validation windows, at most MAX_VALIDATION_STEPS batches
    checkpoint_every: int = 1          # epochs
    keep: int = 3                      # last K checkpoints (+ the best by val_loss)
    backup_every: str = "epoch"        # "epoch", a number of steps, or "off"
    backup_dir: str = ""
    mixed_precision: bool = False
    class_weighting: str = "none"      # one of CLASS_WEIGHTINGS
    class_weight_max: float = 10.0
    shuffle_buffer: int = 2048         # windows
    seed: int = 0
    membership: str = "auto"           # one of MEMBERSHIPS
    port_base: int = 0
    cache_dir: str = ""
    progress: str = "auto"             # one of PROGRESS
    # the invocation, not training settings (not in DEFAULTS, not in run.json)
    resume: bool = False
    endpoint_url: str | None = None
    s3_max_attempts: int | None = None
    s3_checksum: str | None = None
    s3_retry_seconds: float | None = None
    explicit: tuple = ()           # names set by flags or the config file (not defaults)

    def __post_init__(self) -> None:
        from midiforge.model.lstm import parse_units

        object.__setattr__(self, "lstm_units", parse_units(self.lstm_units))
        for name in ("shards", "model_dir", "backup_dir", "cache_dir"):  # absolute: workers may run elsewhere
            value = getattr(self, name)
            if value and "://" not in value:
                object.__setattr__(self, name, os.path.abspath(os.path.expanduser(value)))
        object.__setattr__(self, "backup_every", str(self.backup_every))
        object.__setattr__(self, "explicit", tuple(sorted(set(self.explicit))))
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        for name in ("epochs", "batch_size", "seq_len", "embedding_dim", "checkpoint_every", "keep"):
            if int(getattr(self, name)) < 1:
                raise MidiforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "validation_steps", "shuffle_buffer", "port_base"):
            if int(getattr(self, name)) < 0:
                raise MidiforgeError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 <= float(self.dropout) < 1:
            raise MidiforgeError(f"--dropout must be in [0, 1), got {self.dropout}")
        if float(self.learning_rate) <= 0:
            raise MidiforgeError("--learning-rate must be > 0")
        if self.s3_retry_seconds is not None and not (isinstance(self.s3_retry_seconds, (int, float))
                                                      and 0 <= self.s3_retry_seconds < float("inf")):
            raise MidiforgeError(f"--s3-retry-seconds {self.s3_retry_seconds!r}: must be a number of seconds >= 0")

    def _check_choices(self) -> None:
        if self.backup_every not in ("epoch", "off") and not (self.backup_every.isdigit() and int(self.backup_every) > 0):
            raise MidiforgeError(f"--backup-every {self.backup_every!r}: use 'epoch', a number of steps, or 'off'")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise MidiforgeError(f"--class-weighting {self.class_weighting!r}: use none, sqrt or inverse")
        if self.progress not in PROGRESS:
            raise MidiforgeError(f"--progress {self.progress!r}: use auto, bar, epoch or none")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lstm_units"] = list(self.lstm_units)
        d["explicit"] = list(self.explicit)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        return cls(**d)

    def storage_options(self) -> StorageOptions:
        return options_from_args(argparse.Namespace(endpoint_url=self.endpoint_url,
                                                    s3_max_attempts=self.s3_max_attempts,
                                                    s3_retry_seconds=self.s3_retry_seconds,
                                                    s3_checksum=self.s3_checksum))

    def run_settings(self) -> dict:
        """What run.json records (and a continued run starts from)."""
        keep = set(DEFAULTS) - {"membership", "port_base", "cache_dir", "progress", "backup_dir"}
        d = {k: v for k, v in self.to_dict().items() if k in keep}
        return d


#: TrainSettings fields that are not training settings: the paths, the invocation (--resume, the
#: object-storage flags) and the bookkeeping.
NOT_SETTINGS = ("shards", "model_dir", "resume", "endpoint_url", "s3_max_attempts", "s3_checksum",
                "s3_retry_seconds", "explicit")
#: The training settings' defaults (read from the dataclass; the flags' help shows them).
DEFAULTS = {f.name: f.default for f in fields(TrainSettings) if f.name not in NOT_SETTINGS}


def default_text(name: str) -> str:
    """A setting's default as the flags' help shows it: ``256,256``, ``off``, ``0.002``."""
    value = DEFAULTS[name]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
