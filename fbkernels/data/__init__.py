"""Data for the experiments, generated or read from a directory the caller gives (nothing is downloaded):
noisy polygons (Feedback U-Net), CIFAR-10 and Speech Commands readers, a synthetic classification set and log-mel
spectrograms (CBL-CNN)."""
from .cifar import CIFAR10, cifar10
from .speech import SpeechCommands, speech_commands
from .synthetic import SyntheticClassification, synthetic_classification
from .mel import log_mel_spectrogram
from .polygons import PolygonDataset
