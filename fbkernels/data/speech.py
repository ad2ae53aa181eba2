"""Speech Commands reader for the standard directory of WAV files (no download).

Layout: ``root/<word>/<speaker>_nohash_<n>.wav`` (16 kHz mono 16-bit PCM), ``root/validation_list.txt``
and ``root/testing_list.txt`` (one ``<word>/<file>.wav`` path per line). "val" and "test" are the
listed files, "train" every other clip; folders starting with "_" (``_background_noise_``) are left
out. Labels are the word folders sorted by name (35 words in v0.02). Clips are zero-padded or cut to
1 s; items are (log-mel spectrogram float32 [1, 64, 101], int label).
"""
from __future__ import annotations

import os
import posixpath
import wave

import numpy as np
import torch
from torch.utils.data import Dataset

from .._settings import check_choice, check_int_setting
from .mel import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, log_mel_spectrogram

__all__ = ["SpeechCommands", "speech_commands", "read_wav", "fit_length"]

SPLITS = ("train", "val", "test")
LIST_FILES = {"val": "validation_list.txt", "test": "testing_list.txt"}
MEL_BACKENDS = ("auto", "torch", "torchaudio")


def read_wav(path, *, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Samples of a mono 16-bit PCM WAV file as float32 [samples] in [-1, 1)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WAV file {path!r} does not exist")
    try:
        with wave.open(path, "rb") as wav:
            channels, width, rate, frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            raw = wav.readframes(frames)
    except (wave.Error, EOFError) as error:
        # EOFError carries no text (an empty or cut-short header): say what it means.
        reason = str(error) or "the file ends inside its header"
        raise ValueError(f"{path!r} is not a readable PCM WAV file: {reason}") from error
    if channels != 1 or width != 2:
        raise ValueError(f"{path!r}: expected mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples")
    if rate != sample_rate:
        raise ValueError(f"{path!r}: expected a {sample_rate} Hz sample rate, got {rate} Hz")
    if len(raw) != frames * width:
        raise ValueError(
            f"{path!r} is truncated: its header announces {frames} samples ({frames * width} bytes), the file holds "
            f"{len(raw)} bytes of sample data"
        )
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return torch.from_numpy(samples)


def fit_length(samples: torch.Tensor, length: int = SAMPLE_RATE) -> torch.Tensor:
    """Zero-pad at the end or cut to the first ``length`` samples."""
    if samples.shape[-1] >= length:
        return samples[..., :length]
    return torch.nn.functional.pad(samples, (0, length - samples.shape[-1]))


def _read_list(root: str, name: str) -> set[str]:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Speech Commands split list {path!r} is missing (the standard directory has "
                                f"{LIST_FILES['val']} and {LIST_FILES['test']} next to the word folders)")
    with open(path, encoding="utf-8") as file:
        # Normalise separators and "./" or "a/../" so that lists written on any OS, or by a script, match the
        # "<word>/<file>.wav" paths built from the folders.
        return {posixpath.normpath(line.strip().replace("\\", "/")) for line in file if line.strip()}


class SpeechCommands(Dataset):
    """Speech Commands split as a Dataset of (log-mel [1, n_mels, frames] float32, int label).

    The spectrograms are computed on access (``log_mel_spectrogram`` of the 1 s clip).
    ``classes`` are the word folders sorted by name; label i is ``classes[i]``.
    """

    def __init__(self, root, split: str = "train", *, n_mels: int = N_MELS, mel_backend: str = "auto"):
        check_choice("split", split, SPLITS)
        # Checked now: the spectrograms are computed on access, so a typo would first fail in a DataLoader worker,
        # and n_mels=0 gave empty [1, 0, 101] features without an error.
        check_int_setting("n_mels", n_mels, 1)
        check_choice("mel_backend", mel_backend, MEL_BACKENDS)
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Speech Commands root {root!r} does not exist")
        classes = sorted(
            name for name in os.listdir(root)
            if not name.startswith(("_", ".")) and os.path.isdir(os.path.join(root, name))
        )
        if not classes:
            raise FileNotFoundError(f"no word folders in Speech Commands root {root!r} (expected one folder of WAVs per word)")
        val_list, test_list = _read_list(root, LIST_FILES["val"]), _read_list(root, LIST_FILES["test"])
        listed = {"val": val_list, "test": test_list}
        items = []
        for label, word in enumerate(classes):
            for name in sorted(os.listdir(os.path.join(root, word))):
                if not name.lower().endswith(".wav"):
                    continue
                relative = f"{word}/{name}"
                in_split = (relative not in val_list and relative not in test_list) if split == "train" else relative in listed[split]
                if in_split:
                    items.append((relative, label))
        if split != "train":
            known = {relative for relative, _ in items}
            missing = sorted(p for p in listed[split] if p not in known and not p.startswith("_"))
            if missing:
                raise FileNotFoundError(f"{LIST_FILES[split]} lists {len(missing)} file(s) missing under {root!r}, "
                                        f"e.g. {missing[0]!r}")
        self.root, self.split, self.classes, self.items = root, split, tuple(classes), items
        self.num_classes, self.in_channels = len(classes), 1
        self.n_mels, self.mel_backend = n_mels, mel_backend

    def __len__(self) -> int:
        return len(self.items)

    def waveform(self, index: int) -> torch.Tensor:
        """The 1 s clip [SAMPLE_RATE] of item ``index``."""
        relative, _ = self.items[index]
        return fit_length(read_wav(os.path.join(self.root, *relative.split("/"))))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        features = log_mel_spectrogram(self.waveform(index), n_mels=self.n_mels, n_fft=N_FFT,
                                       hop_length=HOP_LENGTH, backend=self.mel_backend)
        return features.unsqueeze(0), self.items[index][1]


def speech_commands(root, split: str = "train", **kwargs) -> SpeechCommands:
    """The Speech Commands ``split`` ("train" | "val" | "test") read from ``root``; see ``SpeechCommands``."""
    return SpeechCommands(root, split, **kwargs)
