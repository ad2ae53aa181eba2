from .cbl import CBLCNN, ContextualLoops, SmallCNN, StandardCNN  # cbl engineer
from .feedback import DecayMatrix, FeedbackLoop, state_changes  # feedback-unet engineer
from .unet import FeedbackUNet, FeedforwardUNet, UNet  # feedback-unet engineer
