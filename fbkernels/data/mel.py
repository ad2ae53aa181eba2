"""Log-mel spectrogram front end for Speech Commands.

``log_mel_spectrogram(waveform [..., samples]) -> [..., n_mels, frames]`` with
frames = 1 + samples // hop_length (centred, reflect-padded frames). It uses
``torchaudio.transforms.MelSpectrogram`` when torchaudio is installed and otherwise this module's
``torch.stft`` implementation of the same transform (torchaudio's defaults: periodic Hann window,
power 2, HTK mel scale, triangular filters without area normalisation); both are then ``log(mel + eps)``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["hz_to_mel", "mel_to_hz", "mel_filterbank", "mel_center_frequencies", "mel_spectrogram", "log_mel_spectrogram"]

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms windows at 16 kHz
HOP_LENGTH = 160  # 10 ms hop: 101 frames per 1 s clip
N_MELS = 64
LOG_EPS = 1e-6


def hz_to_mel(freq):
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    if isinstance(freq, torch.Tensor):
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_to_hz(mel):
    if isinstance(mel, torch.Tensor):
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_points(n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """n_mels + 2 frequencies (Hz), equally spaced on the mel scale: filter m spans points m..m+2."""
    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    return mel_to_hz(mels)


def mel_center_frequencies(n_mels: int = N_MELS, f_min: float = 0.0, f_max: float | None = None,
                           sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Centre frequency (Hz) of each mel filter, [n_mels] float64: where filter m's response is 1."""
    f_max = sample_rate / 2 if f_max is None else f_max
    return _mel_points(n_mels, f_min, f_max)[1:-1]


def mel_filterbank(n_freqs: int, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular mel filters [n_freqs, n_mels] (float32) over the one-sided STFT bins 0..sample_rate/2.

    Filter m rises linearly (in Hz) from point m to 1 at point m+1 and falls to 0 at point m+2, as
    torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk").
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    bin_freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    points = _mel_points(n_mels, f_min, f_max)
    widths = points[1:] - points[:-1]  # [n_mels + 1]
    offsets = points.unsqueeze(0) - bin_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def _torchaudio():
    try:
        import torchaudio  # optional: not installable on every platform
    except ImportError:
        return None
    return torchaudio


def mel_spectrogram(waveform: torch.Tensor, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                    hop_length: int = HOP_LENGTH, n_mels: int = N_MELS, f_min: float = 0.0,
                    f_max: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Mel power spectrogram [..., n_mels, 1 + samples // hop_length] of float ``waveform`` [..., samples].

    backend: "torchaudio", "torch" (the torch.stft implementation) or "auto" (torchaudio if installed).
    """
    if not isinstance(waveform, torch.Tensor) or not waveform.is_floating_point() or waveform.dim() < 1:
        raise TypeError(f"waveform must be a float tensor [..., samples], got {getattr(waveform, 'dtype', type(waveform))}")
    if backend not in ("auto", "torch", "torchaudio"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'torchaudio', got {backend!r}")
    torchaudio = _torchaudio() if backend != "torch" else None
    if backend == "torchaudio" and torchaudio is None:
        raise ImportError("backend='torchaudio' needs torchaudio, which is not installed; use backend='torch'")
    if torchaudio is not None:
        transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min=f_min, f_max=f_max,
        ).to(device=waveform.device, dtype=waveform.dtype)
        return transform(waveform)
    batch_shape = waveform.shape[:-1]
    flat = waveform.reshape(-1, waveform.shape[-1])
    window = torch.hann_window(n_fft, periodic=True, dtype=waveform.dtype, device=waveform.device)
    spec = torch.stft(flat, n_fft=n_fft, hop_length=hop_length, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec.abs().pow(2)  # [N, n_fft // 2 + 1, frames]
    fbank = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max).to(power)
    mel = torch.matmul(fbank.t(), power)  # [N, n_mels, frames]
    return mel.reshape(*batch_shape, n_mels, mel.shape[-1])


def log_mel_spectrogram(waveform: torch.Tensor, *, eps: float = LOG_EPS, **kwargs) -> torch.Tensor:
    """log(mel_spectrogram(waveform) + eps): [..., n_mels, frames]; kwargs as ``mel_spectrogram``."""
    return torch.log(mel_spectrogram(waveform, **kwargs) + eps)
