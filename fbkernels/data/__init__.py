from .cifar import CIFAR10, cifar10  # cbl engineer
from .speech import SpeechCommands, speech_commands  # cbl engineer
from .synthetic import SyntheticClassification, synthetic_classification  # cbl engineer
from .mel import log_mel_spectrogram  # cbl engineer
from .polygons import PolygonDataset  # feedback-unet engineer
