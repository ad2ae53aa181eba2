"""Data readers on small files in the real formats (CIFAR-10 python pickles, Speech Commands WAVs) and the
log-mel front end."""
import os
import pickle
import wave

import numpy as np
import pytest
import torch

from fbkernels.data import cifar10, speech_commands
from fbkernels.data.cifar import CIFAR10, CIFAR10_MEAN, CIFAR10_STD, stratified_split
from fbkernels.data.mel import log_mel_spectrogram, mel_center_frequencies, mel_filterbank, mel_spectrogram
from fbkernels.data.speech import read_wav
from fbkernels.data.synthetic import SyntheticClassification, synthetic_classification

# ---------------------------------------------------------------- CIFAR-10


def _write_cifar_batch(path, data, labels):
    with open(path, "wb") as file:
        pickle.dump({b"batch_label": b"test", b"labels": list(labels), b"data": data, b"filenames": []}, file, protocol=2)


@pytest.fixture
def cifar_root(tmp_path):
    """cifar-10-batches-py/ with 5 train batches of 20 images (10 per class overall) and a test batch of 7."""
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    labels = np.repeat(np.arange(10), 10)
    rng.shuffle(labels)
    for i in range(5):
        chunk = labels[20 * i:20 * (i + 1)]
        data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        _write_cifar_batch(directory / f"data_batch_{i + 1}", data, chunk)
        all_data.append(data)
        all_labels.append(chunk)
    test_data = rng.integers(0, 256, size=(7, 3072), dtype=np.uint8)
    test_labels = np.arange(7)
    _write_cifar_batch(directory / "test_batch", test_data, test_labels)
    with open(directory / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"airplane"] * 10}, file, protocol=2)
    return tmp_path, np.concatenate(all_data), np.concatenate(all_labels), test_data, test_labels


def _normalised(row):
    image = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 255.0
    return (image - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)


def test_cifar_test_split_reads_pixels_in_channel_planes(cifar_root):
    root, _, _, test_data, test_labels = cifar_root
    test = cifar10(root, "test")
    assert len(test) == 7 and test.num_classes == 10
    for i in range(7):
        image, label = test[i]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert label == int(test_labels[i])
        torch.testing.assert_close(image, _normalised(test_data[i]))
    # Red plane first: pixel (0, 0) of channel 1 is byte 1024 of the row.
    image, _ = test[0]
    expected_green = (test_data[0, 1024] / 255.0 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert image[1, 0, 0].item() == pytest.approx(expected_green, rel=1e-5)


def test_cifar_train_val_split_is_stratified_disjoint_and_seeded(cifar_root):
    root, data, labels, _, _ = cifar_root
    batches_dir = os.path.join(root, "cifar-10-batches-py")
    train, val = cifar10(root, "train", augment=False), cifar10(batches_dir, "val")  # root or the folder itself
    assert len(train) == 90 and len(val) == 10
    # One validation image per class (10% of 10), every class also in train.
    assert sorted(val.labels.tolist()) == list(range(10))
    assert torch.bincount(train.labels, minlength=10).tolist() == [9] * 10
    # Train and val images together are exactly the 100 training images.
    rows = {bytes(r) for r in data}
    seen = [bytes(img.numpy().reshape(-1)) for img in torch.cat([train.images, val.images])]
    assert len(set(seen)) == 100 and set(seen) == rows
    # Items carry their own labels.
    for dataset in (train, val):
        for i in (0, len(dataset) - 1):
            image, label = dataset[i]
            row = dataset.images[i].numpy().reshape(-1)
            match = np.flatnonzero((data == row).all(axis=1))
            assert labels[match[0]] == label
            torch.testing.assert_close(image, _normalised(row))
    # Fixed seed: same split again; another seed: a different one.
    assert torch.equal(cifar10(root, "val").images, val.images)
    assert not torch.equal(cifar10(root, "val", seed=1).images, val.images)


def test_stratified_split_full_size_gives_500_per_class():
    labels = np.repeat(np.arange(10), 5000)
    train, val = stratified_split(labels, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert np.bincount(labels[val]).tolist() == [500] * 10
    assert np.intersect1d(train, val).size == 0


def test_cifar_augmentation_is_a_padded_crop_or_flip(cifar_root):
    root = cifar_root[0]
    plain, augmented = cifar10(root, "train", augment=False), cifar10(root, "train")
    assert augmented.augment and not cifar10(root, "val").augment
    torch.manual_seed(3)
    for i in range(4):
        out, _ = augmented[i]
        padded = torch.nn.functional.pad(plain[i][0], (4, 4, 4, 4))
        candidates = [padded[:, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert out.shape == (3, 32, 32)
        assert any(torch.equal(out, c) for c in candidates)


def test_cifar_errors_name_the_problem(cifar_root, tmp_path):
    root = cifar_root[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar10(tmp_path / "nowhere", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        cifar10(empty, "test")
    with pytest.raises(ValueError, match="split"):
        cifar10(root, "validation")
    directory = root / "cifar-10-batches-py"
    (directory / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3"):
        cifar10(root, "train")
    _write_cifar_batch(directory / "data_batch_3", np.zeros((4, 100), dtype=np.uint8), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="3072"):
        cifar10(root, "val")
    os.remove(directory / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar10(root, "train")


def test_cifar_labels_fraction_and_augment_are_checked_not_coerced(cifar_root):
    root = cifar_root[0]
    directory = root / "cifar-10-batches-py"
    # Float labels were truncated by astype(int64) (0.5 -> class 0), bools read as classes 0 and 1.
    for labels in ([0.5] * 7, [True] * 7):
        _write_cifar_batch(directory / "test_batch", np.zeros((7, 3072), dtype=np.uint8), labels)
        with pytest.raises(ValueError, match=r"test_batch.*'labels' must be integer class indices in 0..9, got dtype"):
            cifar10(root, "test")
    # A fraction outside [0, 1] was clamped to one item per class, or all items but one.
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=f"val_fraction must be a finite number >= 0 and <= 1, got {bad}"):
            CIFAR10(root, "val", val_fraction=bad)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(np.arange(20) % 2, 2.0)
    # augment="no" was bool("no"), i.e. True.
    with pytest.raises(TypeError, match="augment must be None or a bool, got str 'no'"):
        cifar10(root, "train", augment="no")


# ---------------------------------------------------------------- Speech Commands


def _write_wav(path, samples, *, rate=16_000, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.fixture
def speech_root(tmp_path):
    """Words no/up/yes with 3 clips each (one short, one long), background noise, the two split lists."""
    rng = np.random.default_rng(0)
    clips = {}
    for word in ("yes", "no", "up"):
        for name, length in (("a_nohash_0", 16_000), ("b_nohash_0", 8_000), ("c_nohash_0", 20_000)):
            samples = rng.integers(-20_000, 20_000, size=length)
            _write_wav(tmp_path / word / f"{name}.wav", samples)
            clips[f"{word}/{name}.wav"] = samples
    _write_wav(tmp_path / "_background_noise_" / "white_noise.wav", rng.integers(-100, 100, size=32_000))
    (tmp_path / "validation_list.txt").write_text("no/b_nohash_0.wav\nup/a_nohash_0.wav\n")
    (tmp_path / "testing_list.txt").write_text("yes/c_nohash_0.wav\n")
    return tmp_path, clips


def test_speech_splits_labels_and_items(speech_root):
    root, clips = speech_root
    train, val, test = (speech_commands(root, split) for split in ("train", "val", "test"))
    assert train.classes == ("no", "up", "yes") and train.num_classes == 3
    assert sorted(val.items) == [("no/b_nohash_0.wav", 0), ("up/a_nohash_0.wav", 1)]
    assert test.items == [("yes/c_nohash_0.wav", 2)]
    assert len(train) == 9 - 3
    assert not any(p.startswith("_") for p, _ in train.items)
    for dataset in (train, val, test):
        for i in range(len(dataset)):
            features, label = dataset[i]
            assert features.shape == (1, 64, 101) and features.dtype == torch.float32
            assert torch.isfinite(features).all()
            assert label == dataset.classes.index(dataset.items[i][0].split("/")[0])


def test_speech_lists_match_paths_written_with_dot_or_backslash(speech_root):
    # "./no/b_nohash_0.wav" did not match "no/b_nohash_0.wav": the clip was reported missing.
    root, _ = speech_root
    (root / "validation_list.txt").write_text("./no/b_nohash_0.wav\nup\\a_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/../yes/c_nohash_0.wav\n")
    assert sorted(speech_commands(root, "val").items) == [("no/b_nohash_0.wav", 0), ("up/a_nohash_0.wav", 1)]
    assert speech_commands(root, "test").items == [("yes/c_nohash_0.wav", 2)]
    assert len(speech_commands(root, "train")) == 6


def test_speech_clips_are_padded_or_cut_to_one_second(speech_root):
    root, clips = speech_root
    val, test = speech_commands(root, "val"), speech_commands(root, "test")
    short = val.waveform([p for p, _ in val.items].index("no/b_nohash_0.wav"))
    assert short.shape == (16_000,)
    torch.testing.assert_close(short[:8_000], torch.from_numpy(clips["no/b_nohash_0.wav"] / 32768.0).float())
    assert torch.all(short[8_000:] == 0)
    long = test.waveform(0)
    assert long.shape == (16_000,)
    torch.testing.assert_close(long, torch.from_numpy(clips["yes/c_nohash_0.wav"][:16_000] / 32768.0).float())
    # The item is the log-mel of that 1 s clip.
    torch.testing.assert_close(test[0][0][0], log_mel_spectrogram(long))


def test_speech_errors_name_the_problem(speech_root, tmp_path_factory):
    root, _ = speech_root
    with pytest.raises(FileNotFoundError, match="does not exist"):
        speech_commands(root / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        speech_commands(root, "validation")
    bad = tmp_path_factory.mktemp("bad")
    _write_wav(bad / "stereo.wav", np.zeros(200), channels=2)
    with pytest.raises(ValueError, match="mono 16-bit"):
        read_wav(bad / "stereo.wav")
    _write_wav(bad / "slow.wav", np.zeros(100), rate=8_000)
    with pytest.raises(ValueError, match="16000 Hz"):
        read_wav(bad / "slow.wav")
    for cut in (1, 2):  # mid-sample (an odd byte count) and mid-file (fewer frames than the header says)
        _write_wav(bad / f"cut{cut}.wav", np.arange(100))
        data = (bad / f"cut{cut}.wav").read_bytes()
        (bad / f"cut{cut}.wav").write_bytes(data[:-(cut * 21)])
        with pytest.raises(ValueError, match=rf"cut{cut}\.wav.*truncated"):
            read_wav(bad / f"cut{cut}.wav")
    (bad / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(ValueError, match="junk.wav"):
        read_wav(bad / "junk.wav")
    (root / "testing_list.txt").write_text("yes/c_nohash_0.wav\nyes/missing.wav\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        speech_commands(root, "test")
    os.remove(root / "validation_list.txt")
    with pytest.raises(FileNotFoundError, match="validation_list.txt"):
        speech_commands(root, "train")
    # An empty file: wave's EOFError has no text, which left the message ending in ": ".
    (bad / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.wav' is not a readable PCM WAV file: the file ends inside its header"):
        read_wav(bad / "empty.wav")


def test_speech_feature_settings_are_checked_when_built(speech_root):
    root, _ = speech_root
    # Features are computed on access: a typo first failed inside a DataLoader worker, n_mels=0 gave [1, 0, 101].
    with pytest.raises(ValueError, match=r"mel_backend must be one of \['auto', 'torch', 'torchaudio'\], got 'torchaduio'"):
        speech_commands(root, "val", mel_backend="torchaduio")
    with pytest.raises(ValueError, match="n_mels must be >= 1, got 0"):
        speech_commands(root, "val", n_mels=0)
    with pytest.raises(TypeError, match="n_mels must be an int >= 1, got float 8.5"):
        speech_commands(root, "val", n_mels=8.5)
    assert speech_commands(root, "val", n_mels=8, mel_backend="torch")[0][0].shape == (1, 8, 101)


# ---------------------------------------------------------------- mel front end


@pytest.mark.parametrize("mel_bin", [12, 25, 40, 55])
def test_pure_tone_peaks_in_its_mel_bin(mel_bin):
    frequency = float(mel_center_frequencies()[mel_bin])
    t = torch.arange(16_000, dtype=torch.float64) / 16_000
    features = log_mel_spectrogram(torch.sin(2 * torch.pi * frequency * t), backend="torch")
    assert features.shape == (64, 101)
    assert int(features.mean(dim=-1).argmax()) == mel_bin


def test_mel_filterbank_triangles():
    fbank = mel_filterbank(201)
    assert fbank.shape == (201, 64)
    assert (fbank >= 0).all() and fbank.max() <= 1.0
    # Each filter covers one band: non-zero bins are contiguous and the peak bin sits near its centre.
    centres = mel_center_frequencies()
    bin_freqs = torch.linspace(0, 8000, 201)
    for m in range(20, 64, 7):
        support = torch.nonzero(fbank[:, m]).flatten()
        assert (support.diff() == 1).all()
        assert abs(float(bin_freqs[fbank[:, m].argmax()]) - float(centres[m])) <= 40.0


def test_mel_spectrogram_batches_and_scales_quadratically():
    wave_batch = torch.randn(2, 3, 4_000)
    out = mel_spectrogram(wave_batch, backend="torch")
    assert out.shape == (2, 3, 64, 4_000 // 160 + 1)
    torch.testing.assert_close(mel_spectrogram(2 * wave_batch[1, 2], backend="torch"), 4 * out[1, 2])


def test_mel_matches_torchaudio_when_installed():
    pytest.importorskip("torchaudio")
    wave_batch = torch.randn(2, 16_000)
    torch.testing.assert_close(mel_spectrogram(wave_batch, backend="torch"),
                               mel_spectrogram(wave_batch, backend="torchaudio"), rtol=1e-4, atol=1e-4)


def test_mel_without_torchaudio_is_a_clear_error():
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchaudio"):
            mel_spectrogram(torch.zeros(400), backend="torchaudio")
    else:
        pytest.skip("torchaudio is installed")


# ---------------------------------------------------------------- synthetic fallback set


def test_synthetic_set_is_deterministic_balanced_and_shares_the_task():
    a, b = synthetic_classification("train", 40, size=8), synthetic_classification("train", 40, size=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [4] * 10
    image, label = a[0]
    assert image.shape == (3, 8, 8) and isinstance(label, int)
    test = synthetic_classification("test", 40, size=8)
    assert not torch.equal(test.images, a.images)
    # Same class prototypes in every split: without noise, shift and distractor every item of class c, in
    # any split, is a positive multiple of the same pattern.
    clean = dict(size=8, noise=0.0, max_shift=0, max_distractor=0.0)
    train_clean, test_clean = synthetic_classification("train", 20, **clean), synthetic_classification("test", 20, **clean)
    flat = torch.nn.functional.normalize(torch.cat([train_clean.images, test_clean.images]).flatten(1), dim=1)
    labels = torch.cat([train_clean.labels, test_clean.labels])
    same_class = labels[:, None] == labels[None, :]
    cosine = flat @ flat.t()
    torch.testing.assert_close(cosine[same_class], torch.ones(int(same_class.sum())))
    assert cosine[~same_class].max() < 0.99


def test_synthetic_set_arguments_are_checked_under_their_names():
    # torch's errors named no argument (randperm of a float; random_ "from >= to" for a negative max_shift),
    # a NaN noise gave NaN images, and one channel of 1x1 a NaN prototype (the std of one value).
    with pytest.raises(TypeError, match="num_samples must be an int >= 0, got float 10.0"):
        SyntheticClassification(10.0)
    with pytest.raises(TypeError, match="size must be an int >= 1, got float 8.5"):
        SyntheticClassification(10, size=8.5)
    with pytest.raises(ValueError, match="max_shift must be >= 0, got -1"):
        SyntheticClassification(10, max_shift=-1)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        SyntheticClassification(10, num_classes=1)
    for name in ("noise", "max_distractor"):
        for bad in (float("nan"), -1.0):
            with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {bad}"):
                SyntheticClassification(10, **{name: bad})
    with pytest.raises(ValueError, match=r"need channels \* size \* size >= 2"):
        SyntheticClassification(4, channels=1, size=1)
    assert torch.isfinite(SyntheticClassification(4, channels=2, size=1).images).all()
